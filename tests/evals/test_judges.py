"""Second judges (`distill eval --judges`): more feature networks scoring the same images, one name per network, a
student flagged in the column of the network it trained against, and a judge that cannot be had refused before
anything is generated."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

import cli
from distill.errors import ConfigError, ModelError
from evals.calibrate import add_noise
from evals.decision import decide, network_key
from evals.emoji import load_emoji
from evals.features import EffNetLite1Features, build_feature_net, features
from evals.measure import Measure, judge_quality
from evals.recommend import recommend
from evals.report import write
from evals.schema import validate
from evals.settings import EvalSettings
from evals.tables import NOT_INDEPENDENT, judges_table
from tests.evals.test_report import make_report

JUDGES = [{"name": "effnet-lite1", "network": "effnet-lite1", "fd_name": "FD-EffNet-L1", "num_features": 1280,
           "feature_resolution": 128},
          {"name": "dinov2", "network": "dinov2", "fd_name": "FD-DINOv2", "num_features": 384,
           "feature_resolution": 224}]


def test_network_names_are_one_key_per_network():
    for spellings in (["effnet-lite1", "EfficientNet-Lite1", "efficientnet_lite1", "tf_efficientnet_lite1"],
                      ["effnet-lite0", "EfficientNet-Lite0"],
                      ["dinov2", "dinov2-small", "DINOv2-Small", "facebook/dinov2-small", "dinov2:facebook/dinov2-small",
                       "dinov2:/models/dinov2-small/"],
                      ["inception", "InceptionV3", "inception-v3-compat"]):
        assert len({network_key(name) for name in spellings}) == 1, spellings
    keys = {network_key(n) for n in ("effnet-lite0", "effnet-lite1", "dinov2", "dinov2:facebook/dinov2-base",
                                     "inception")}
    assert len(keys) == 5  # Lite0 is not Lite1, ViT-S is not ViT-B


@pytest.fixture(scope="module")
def lite1():
    return build_feature_net("effnet-lite1")


def test_lite1_judge_gives_deterministic_1280d_features_of_its_own(lite1):
    assert isinstance(lite1, EffNetLite1Features) and lite1.fd_name == "FD-EffNet-L1"
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first, again = features(images, net=lite1), features(images, net=lite1)
    assert first.shape == (2, 1280) and torch.equal(first, again)
    assert not torch.allclose(first[0], first[1])  # it looks at the image
    lite0 = features(images, net=build_feature_net("effnet-lite0"))
    assert (first - lite0).abs().max() > 0.1  # another network, not Lite0 under another name


def test_a_judges_fd_is_zero_on_identical_sets_and_grows_with_the_difference():
    measure = Measure("effnet-lite0", "none", "cpu", judges=["effnet-lite1"])
    real = load_emoji(32)
    rows = torch.randperm(len(real.captions), generator=torch.Generator().manual_seed(0))[:64]
    a, b = real.images[rows[:32]], real.images[rows[32:]]
    ref = measure.judge_features(a)
    same = judge_quality(ref, measure.judge_features(a), kid_size=16, seed=0)["effnet-lite1"]
    other = judge_quality(ref, measure.judge_features(b), kid_size=16, seed=0)["effnet-lite1"]
    noisy = judge_quality(ref, measure.judge_features(add_noise(b)), kid_size=16, seed=0)["effnet-lite1"]
    assert same["fd"] == pytest.approx(0, abs=1e-2)  # KID's unbiased estimate is no use here: below 0 on copies
    assert 1 < other["fd"] < noisy["fd"] and same["kid"] < other["kid"] < noisy["kid"]
    assert measure.judge_entries()[0]["fd_name"] == "FD-EffNet-L1" and measure.seconds["judges"] > 0


def _tiny_dinov2(folder):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=224)
    Dinov2Model(config).save_pretrained(str(folder))
    return folder


def test_dinov2_judge_loads_a_local_folder_and_says_when_it_needs_a_download(tmp_path):
    net = build_feature_net(f"dinov2:{_tiny_dinov2(tmp_path / 'tiny-dino')}")
    feats = features(torch.rand(3, 3, 32, 32) * 2 - 1, net=net)  # resized to 224: 16 x 16 patches
    assert feats.shape == (3, net.num_features) == (3, 32) and net.fd_name == "FD-DINOv2"
    with pytest.raises(ModelError, match="needs a download"):  # tests run offline (tests/conftest.py)
        build_feature_net("dinov2")


def _judged_report(feature_network: str) -> dict:
    """make_report() with two second judges on every row and the floor, its students trained against
    `feature_network`, judged by evals.decision.decide."""
    report = make_report()
    report["protocol"]["judges"] = copy.deepcopy(JUDGES)
    for i, row in enumerate(report["rows"]):
        row["judges"] = {"effnet-lite1": {"fd": 100.0 + i, "kid": 5.0, "kid_std": 0.5},
                         "dinov2": {"fd": 300.0 + i, "kid": 9.0, "kid_std": 1.0}}
        if row["role"] == "student":
            row["feature_network"] = feature_network
    report["floor"]["judges"] = {"effnet-lite1": {"fd": 50.0, "kid": 0.1, "kid_std": 0.3},
                                 "dinov2": {"fd": 150.0, "kid": 0.2, "kid_std": 0.4}}
    decide(report["rows"], [], 2.0, report["protocol"]["feature_net"])
    report["recommendations"] = recommend(report)
    return report


def _cell(head, body, label, column):
    return next(row for row in body if row[0] == label)[head.index(column)]


@pytest.mark.parametrize("named, flagged, clean", [("EfficientNet-Lite1", "effnet-lite1", "dinov2"),
                                                   ("dinov2:facebook/dinov2-small", "dinov2", "effnet-lite1")])
def test_a_student_is_flagged_in_the_column_of_the_judge_it_trained_against(named, flagged, clean):
    report = _judged_report(named)
    assert validate(report) == []
    lora, teacher = report["rows"][3], report["rows"][0]
    assert lora["judges"][flagged]["independent"] is False and lora["judges"][clean]["independent"] is True
    assert lora["independent_judge"] is True  # the first judge (Lite0) it never saw
    assert all(s["independent"] for s in teacher["judges"].values())
    head, body = judges_table(report)
    fd = {j["name"]: f"{j['name']}: {j['fd_name']} ↓" for j in JUDGES}
    assert _cell(head, body, "lora@2", fd[flagged]) == f"{lora['judges'][flagged]['fd']:.1f} ({NOT_INDEPENDENT})"
    assert NOT_INDEPENDENT not in _cell(head, body, "lora@2", fd[clean])
    assert NOT_INDEPENDENT not in _cell(head, body, "lora@2", "effnet-lite0: FD-EffNet ↓")
    assert NOT_INDEPENDENT not in _cell(head, body, "teacher@50", fd[flagged])
    kid = lora["judges"][clean]
    assert _cell(head, body, "lora@2", f"{clean}: KID×1000 ↓") == f"{kid['kid']:.2f} ± {kid['kid_std']:.2f}"
    assert _cell(head, body, "real vs real (floor)", fd[flagged]) == f"{report['floor']['judges'][flagged]['fd']:.1f}"
    note = next(r["text"] for r in report["recommendations"] if r["text"].startswith("Second judge"))
    assert f"Second judge {flagged} is not independent of lora@1, lora@2, lora@4" in note
    assert not any(r["text"].startswith("Not an independent judge") for r in report["recommendations"])


def test_the_first_judges_flag_points_at_the_independent_second_judges(tmp_path):
    report = _judged_report("effnet-lite0")
    assert report["rows"][3]["independent_judge"] is False
    head, body = judges_table(report)
    assert _cell(head, body, "lora@2", "effnet-lite0: FD-EffNet ↓").endswith(f"({NOT_INDEPENDENT})")
    warning = next(r["text"] for r in report["recommendations"] if r["text"].startswith("Not an independent judge"))
    assert "the second judges' columns (effnet-lite1, dinov2)" in warning
    write(report, tmp_path)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for text in (md, page):
        assert "Second judges" in text and "FD-EffNet-L1" in text and NOT_INDEPENDENT in text
    assert md.index("## Quality") < md.index("## Second judges") < md.index("## Speed")
    assert judges_table(make_report()) is None and "Second judges" not in json.dumps(make_report())


@pytest.mark.parametrize("judges, words", [(["vgg"], "unknown feature network"),
                                           (["effnet-lite0"], "same network as --feature-net"),
                                           (["dinov2", "dinov2:facebook/dinov2-small"], "list each judge once")])
def test_unknown_or_repeated_judges_are_refused_by_the_settings(judges, words):
    with pytest.raises(ConfigError, match=words):
        EvalSettings(teacher="t", out="o", judges=judges).check()


def test_a_judge_that_cannot_be_loaded_stops_the_eval_before_any_generation(tiny_sd_path, tmp_path, monkeypatch):
    import evals.features
    import evals.run

    built = evals.features.build_feature_net
    started = []

    def offline(name, resolution=128):
        if name == "inception":
            raise ModelError("The InceptionV3 FID network could not be loaded (OSError): it needs a download.")
        return built(name, resolution)

    monkeypatch.setattr(evals.features, "build_feature_net", offline)
    monkeypatch.setattr(evals.run, "generate", lambda *a, **k: started.append("generate"))
    monkeypatch.setattr(evals.run.models, "load_teacher", lambda *a, **k: started.append("teacher"))
    result = CliRunner().invoke(cli.main, ["eval", "--teacher", str(tiny_sd_path), "--judges", "effnet-lite1,inception",
                                           "-n", "8", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "Judge 'inception' cannot be loaded" in result.output and "drop it from --judges" in result.output
    assert started == [] and not (tmp_path / "r" / "report.json").exists()


def test_distill_eval_with_a_second_judge_end_to_end(tiny_sd_v_path, tmp_path):
    """A LoRA whose student.json says its discriminator read EfficientNet-Lite1, judged by Lite0 and Lite1."""
    from distill.info import StudentInfo
    from tests.evals.students import lora_run

    run = lora_run(tmp_path, tiny_sd_v_path)
    info = StudentInfo.load(run / "student")
    info.feature_network = "effnet-lite1"
    info.save(run / "student")
    out = tmp_path / "report"
    result = CliRunner().invoke(cli.main, [
        "eval", "--teacher", str(tiny_sd_v_path), "--student", str(run), "--judges", "effnet-lite1", "--steps", "1",
        "--teacher-steps", "2", "-n", "8", "--batch-size", "8", "--latency-runs", "1", "--latency-warmup", "0",
        "--diversity-prompts", "2", "--diversity-samples", "2", "--baseline", "none", "--no-control",
        "--alignment", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert validate(report) == [] and tuple(map(int, report["schema_version"].split("."))) >= (1, 3, 0)  # judges: 1.3
    assert [j["name"] for j in report["protocol"]["judges"]] == ["effnet-lite1"]
    assert report["protocol"]["judges"][0]["fd_name"] == "FD-EffNet-L1"
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) == {"teacher@2", "teacher@1", "lora_run@1"}
    for row in rows.values():
        score = row["judges"]["effnet-lite1"]
        assert score["fd"] > 0 and score["fd"] != pytest.approx(row["quality"]["fd"])  # its own network
    assert rows["lora_run@1"]["judges"]["effnet-lite1"]["independent"] is False
    assert rows["lora_run@1"]["independent_judge"] is True
    assert rows["teacher@1"]["judges"]["effnet-lite1"]["independent"] is True
    assert report["floor"]["judges"]["effnet-lite1"]["fd"] > 0 and report["timings"]["judges_s"] > 0
    md = (out / "report.md").read_text()
    assert "## Second judges" in md and f"({NOT_INDEPENDENT})" in md
