"""The effect study: its statistics by hand, and a reduced study end to end."""

import json
import math
import os
import sys
import time

import numpy as np
import pytest

STUDIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "studies")
sys.path.insert(0, STUDIES)

import effect_stats  # noqa: E402

# Two-sided 95 % critical values of Student's t, from a printed table.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


def test_paired_interval_matches_a_hand_computation():
    # Differences 2, 3, 1, 5: mean 2.75, squared deviations 0.5625, 0.0625,
    # 3.0625, 5.0625 -> sample variance 8.75 / 3, sd 1.70783.
    result = effect_stats.paired_interval([3, 5, 4, 6], [1, 2, 3, 1])
    sd = math.sqrt(8.75 / 3)
    half = T_975[3] * sd / 2.0
    assert result["n"] == 4
    assert result["mean"] == pytest.approx(2.75)
    assert result["sd"] == pytest.approx(sd)
    assert result["t"] == pytest.approx(T_975[3], abs=1e-3)
    # The table's 3 decimals of t: within 1e-3 * sd / 2 of the exact bounds.
    assert result["half_width"] == pytest.approx(half, abs=1e-3)
    assert result["low"] == pytest.approx(2.75 - half, abs=1e-3)
    assert result["high"] == pytest.approx(2.75 + half, abs=1e-3)
    assert (result["positive"], result["negative"]) == (4, 0)


def test_paired_interval_is_of_differences_not_of_arms():
    # Large between-pair spread, constant difference: a zero-width interval.
    result = effect_stats.paired_interval([11, 51, 91], [10, 50, 90])
    assert result["mean"] == pytest.approx(1.0)
    assert result["half_width"] == pytest.approx(0.0, abs=1e-12)


def test_paired_interval_one_pair_and_bad_input():
    single = effect_stats.paired_interval([2.0], [1.0])
    assert single["mean"] == 1.0 and math.isnan(single["half_width"])
    assert effect_stats.format_interval(single) == "+1.0"
    with pytest.raises(ValueError, match="one length"):
        effect_stats.paired_interval([1, 2], [1, 2, 3])


def test_format_interval():
    text = effect_stats.format_interval(effect_stats.paired_interval([3, 5, 4, 6], [1, 2, 3, 1]))
    assert text == "+2.8 [+0.0, +5.5]"


def test_one_minus_cosine():
    assert effect_stats.one_minus_cosine([1, 0], [2, 0]) == pytest.approx(0.0)
    assert effect_stats.one_minus_cosine([1, 0], [0, 3]) == pytest.approx(1.0)
    assert effect_stats.one_minus_cosine([1, 1], [-1, -1]) == pytest.approx(2.0)
    assert math.isnan(effect_stats.one_minus_cosine([0, 0], [1, 0]))


def test_dynamics_summary_by_hand():
    dynamics = {
        "layers": ["bn"],
        "initial": {"bn": {"gamma": [1.0, 1.0], "beta": [0.0, 0.0]}},
        "after_step_1": {"bn": {"gamma": [1.0, 1.0], "beta": [3.0, 4.0]}},
        "final": {"bn": {"gamma": [0.5, 0.0], "beta": [0.0, 1.0]}},
        "epochs": [{"layers": {"bn": {"beta_norm": 10.0}}},
                   {"layers": {"bn": {"beta_norm": 1.0}}}],
    }
    summary = effect_stats.dynamics_summary(dynamics)["bn"]
    assert summary["gamma_direction_change"] == pytest.approx(1 - 1 / math.sqrt(2))
    assert summary["gamma_norm_ratio"] == pytest.approx(0.5 / math.sqrt(2))
    assert summary["beta_norm_step1"] == pytest.approx(5.0)
    assert summary["beta_norm_ratio"] == pytest.approx(0.2)
    assert summary["beta_direction_change"] == pytest.approx(1 - 4 / 5)
    assert summary["beta_norm_peak"] == pytest.approx(10.0)
    assert summary["beta_norm_shrink_from_peak"] == pytest.approx(0.1)


def test_served_class_strength_by_hand():
    # Channel c's largest weight goes to class c % 2; class 0 is frequent.
    kernel = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    gamma = np.array([2.0, 0.5, 3.0, -0.4])
    beta = np.array([0.1, 0.2, 0.1, 0.2])
    served = effect_stats.served_class_strength(gamma, beta, kernel, [100, 5])
    assert served["served_class"] == [0, 1, 0, 1]
    assert served["served_count"] == [100, 5, 100, 5]
    assert served["abs_gamma"] == [2.0, 0.5, 3.0, 0.4]
    # Frequent-class channels all have the larger |gamma|: rank correlation
    # of (2, .5, 3, .4) with (100, 5, 100, 5), ties averaged, is
    # cov / (sd * sd) over ranks (3, 2, 4, 1) and (3.5, 1.5, 3.5, 1.5).
    ranks_g = np.array([3, 2, 4, 1.0]) - 2.5
    ranks_c = np.array([3.5, 1.5, 3.5, 1.5]) - 2.5
    expected = (ranks_g @ ranks_c) / np.sqrt((ranks_g @ ranks_g) * (ranks_c @ ranks_c))
    assert served["spearman_gamma"] == pytest.approx(expected)
    assert served["spearman_beta"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="4 inputs but the BN layer 3"):
        effect_stats.served_class_strength(gamma[:3], beta[:3], kernel, [100, 5])


@pytest.mark.slow
def test_reduced_study_end_to_end(tmp_path):
    import effect_study

    work, out = tmp_path / "runs", tmp_path / "out"
    effect_study.main(["--tiny", "--decays", "wd5e-3", "--work_dir", str(work),
                       "--out_dir", str(out)])
    with open(out / "effect_study.json") as f:
        study = json.load(f)
    runs = {r["arm"]: r for r in study["runs"]}
    assert set(runs) == {"bn", "nbn", "bn_wd5e-3", "nbn_wd5e-3"}
    assert [r["weight_decay"] for r in runs.values()] == [5e-4, 5e-4, 5e-3, 5e-3]
    for run in runs.values():
        assert run["steps_trained"] == 8
        for name in ("top1", "many", "medium", "few"):
            assert 0.0 <= run["figures"][name] <= 100.0
        for entry in run["mechanics"].values():
            assert 0.0 <= entry["gamma_direction_change"] <= 2.0
            assert 0.0 <= entry["beta_direction_change"] <= 2.0
            assert entry["gamma_norm_ratio"] > 0
    # NBN's zero-start beta is thrown far out by its first step.
    nbn_layer = runs["nbn"]["tracked_layers"][-1]
    assert runs["nbn"]["mechanics"][nbn_layer]["beta_norm_step1"] > 100.0
    assert runs["bn"]["tracked_layers"] == runs["nbn"]["tracked_layers"]
    (cell,) = study["statistics"]["cells"]
    assert cell["same_initial_convs"] == 1
    paired = cell["paired_nbn_minus_bn"]["top1"]
    assert paired["n"] == 1
    assert paired["mean"] == pytest.approx(
        runs["nbn"]["figures"]["top1"] - runs["bn"]["figures"]["top1"])
    assert 0.0 < study["shrink"]["predicted"] < 1.0
    # The weight-decay cell: its own pair, and the formula with its decay.
    recipe, decayed = study["statistics"]["decays"]
    assert (recipe["weight_decay"], decayed["weight_decay"]) == (5e-4, 5e-3)
    assert decayed["predicted_shrink"] == pytest.approx(
        recipe["predicted_shrink"] ** 10, rel=1e-4)
    assert decayed["paired_nbn_minus_bn"]["few"]["mean"] == pytest.approx(
        runs["nbn_wd5e-3"]["figures"]["few"] - runs["bn_wd5e-3"]["figures"]["few"])
    markdown = (out / "effect_study.md").read_text()
    assert "Paired difference NBN − BN" in markdown
    assert "## Total weight decay" in markdown
    assert (out / "effect_paired_differences.png").exists()
    assert (out / "effect_weight_decay.png").exists()
    assert all((work / name / "mechanism.png").exists() for name in
               ("digits_lt_if100_bn_seed0", "digits_lt_if100_nbn_wd5e-3_seed0"))
    # A second invocation reuses both runs instead of training again.
    effect_study.main(["--tiny", "--decays", "wd5e-3", "--work_dir", str(work),
                       "--out_dir", str(out), "--no_pictures"])
    with open(out / "effect_study.json") as f:
        again = json.load(f)
    assert all(r["reused"] for r in again["runs"])
    assert not any(r["reused"] for r in study["runs"])
    assert [r["figures"]["top1"] for r in again["runs"]] == [
        r["figures"]["top1"] for r in study["runs"]]


def test_pair_study_statistics_by_hand():
    import pair_study

    def record(arm, seed, top1, few, fingerprint):
        figures = {"top1": top1, "many": 90.0, "medium": 50.0, "few": few,
                   "classes_per_group": {"many": 2, "medium": 3, "few": 5}}
        return {"data": "d", "imbalance_factor": 100.0, "arm": arm, "seed": seed,
                "figures": figures, "conv_kernel_fingerprint": fingerprint}

    records = [record("bn", 0, 50.0, 10.0, "a"), record("nbn", 0, 53.0, 4.0, "a"),
               record("bn", 1, 60.0, 20.0, "b"), record("nbn", 1, 61.0, 30.0, "c")]
    stats = pair_study.statistics(records)
    # NBN − BN: top1 3 and 1 (mean 2, sd sqrt(2), half-width t(1) * sd / sqrt(2)).
    top1 = stats["paired_nbn_minus_bn"]["top1"]
    assert (top1["n"], top1["mean"]) == (2, pytest.approx(2.0))
    assert top1["half_width"] == pytest.approx(T_975[1], abs=1e-3)
    few = stats["paired_nbn_minus_bn"]["few"]
    assert few["mean"] == pytest.approx(2.0) and (few["positive"], few["negative"]) == (1, 1)
    assert stats["paired_nbn_minus_bn"]["many"]["mean"] == pytest.approx(0.0)
    assert stats["same_initial_convs"] == 1 and stats["seeds"] == [0, 1]


def test_pair_study_refuses_configs_that_are_not_a_pair(tmp_path):
    import pair_study

    configs = os.path.join(os.path.dirname(STUDIES), "configs")
    args = pair_study.parse_args([
        os.path.join(configs, "fashion_mnist_lt_if100_bn.cfg"),
        os.path.join(configs, "fashion_mnist_lt_if10_nbn.cfg"),
        "--work_dir", str(tmp_path), "--out_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="differ in --imbalance_factor: not a paired"):
        pair_study.check_pair(args)
    args.nbn_config = args.bn_config
    with pytest.raises(ValueError, match="must train BN .* NBN"):
        pair_study.check_pair(args)


@pytest.mark.slow
def test_pair_study_of_two_configs_end_to_end(tmp_path, monkeypatch):
    import pair_study
    from tests.helpers import write_fashion_mnist

    _, sha256sums = write_fashion_mnist(str(tmp_path / "idx"), 102, 2)
    (tmp_path / "no_tfds").mkdir()
    # IF 100 from n_max 100: int(100 * 0.01 ** (i / 9)) = 100, 59, 35, 21, 12, 7,
    # 4, 2, 1, 1 images, 242 in all: ceil(242 / 16) = 16 steps an epoch, the
    # last of 2 images (the config sets no --steps_per_epoch; the partial
    # batch is kept); 2 epochs at lr 0.2 * 16 / 256 = 0.0125, the second at 0.1x.
    flags = [f"--fashion_mnist_dir={tmp_path / 'idx'}", f"--fashion_mnist_sha256={sha256sums}",
             f"--data_dir={tmp_path / 'no_tfds'}", "--fashion_mnist_val_per_class=2",
             "--n_max=100", "--backbone=resnet8", "--global_batch_size=16", "--epochs=2",
             "--warmup_epochs=0", "--lr_drop_epochs=1", "--lr_drop_factors=0.1"]
    # From the repository root, as documented; the report names the configs as given.
    monkeypatch.chdir(os.path.dirname(STUDIES))
    argv = ["configs/fashion_mnist_lt_if100_bn.cfg",
            "configs/fashion_mnist_lt_if100_nbn.cfg", "--seeds", "0",
            "--workers", "2", "--threads", "1", "--work_dir", str(tmp_path / "runs"),
            "--out_dir", str(tmp_path / "out"), *[f"--extra_flag={f}" for f in flags]]
    pair_study.main(argv)
    study = json.loads((tmp_path / "out" / "pair_study.json").read_text())
    runs = {r["arm"]: r for r in study["runs"]}
    assert set(runs) == {"bn", "nbn"}
    top1 = {arm: json.loads((tmp_path / "runs" / f"fashion_mnist_lt_if100_{arm}_seed0"
                             / "test_metrics.json").read_text())["top1"] for arm in runs}
    paired = study["statistics"]["paired_nbn_minus_bn"]["top1"]
    assert paired["n"] == 1 and paired["mean"] == pytest.approx(top1["nbn"] - top1["bn"])
    assert study["statistics"]["same_initial_convs"] == 1
    assert all(r["steps_trained"] == 32 for r in runs.values())
    # Σlr = 16 * 0.0125 + 16 * 0.00125; shrink exp(-5e-4 * Σlr / (1 - 0.9)).
    assert study["shrink"]["sum_lr"] == pytest.approx(0.22, rel=1e-5)
    assert study["shrink"]["predicted"] == pytest.approx(math.exp(-5e-4 * 0.22 / 0.1))
    nbn_layer = runs["nbn"]["tracked_layers"][-1]
    assert runs["nbn"]["mechanics"][nbn_layer]["beta_norm_step1"] > 100.0
    markdown = (tmp_path / "out" / "pair_study.md").read_text()
    assert "Paired difference NBN − BN" in markdown and "machine:" in markdown
    assert "load average" in markdown
    assert "| BN | `configs/fashion_mnist_lt_if100_bn.cfg` | 1 |" in markdown
    assert (tmp_path / "out" / "pair_paired_differences.png").exists()
    assert not any(r["reused"] for r in study["runs"])
    # Resuming: each finished run is found and reused, not trained again.
    import effect_study

    args = pair_study.parse_args(argv)
    todo = pair_study.jobs(args, pair_study.check_pair(args))
    assert [effect_study.train(args, job, pair_study.make_command(args))[1]
            for job in todo] == [None, None]


def test_a_killed_and_resumed_run_counts_both_sittings(tmp_path, monkeypatch):
    import types

    import effect_study

    monkeypatch.setattr(effect_study, "LOAD_SAMPLE_SECONDS", 0.1)

    args = types.SimpleNamespace(work_dir=str(tmp_path), threads=1)
    job = ("digits_lt", 100.0, "nbn", 0)
    run_dir = tmp_path / effect_study.run_name(*job)
    script = ("import pathlib, sys, time; time.sleep(0.6); "
              "pathlib.Path(sys.argv[1], 'test_metrics.json').write_text('{}')")

    def make_command(args, *job_and_run_dir):
        return [sys.executable, "-c", script, str(run_dir)]

    # A first sitting, killed: started 100 s ago, the run's last file 40 s ago.
    run_dir.mkdir()
    now = time.time()
    (run_dir / "study_command.json").write_text(json.dumps(
        {"command": make_command(args)}))
    effect_study.write_sittings(str(run_dir), [{"start": now - 100, "load_before": 1.5}])
    (run_dir / "history.csv").write_text("epoch\n0\n")
    os.utime(run_dir / "history.csv", (now - 40, now - 40))
    _, seconds = effect_study.train(args, job, make_command)
    first, second = effect_study.read_sittings(str(run_dir))
    assert first == {"start": now - 100, "load_before": 1.5, "end": pytest.approx(now - 40),
                     "end_from": "last file write"}
    assert seconds == pytest.approx(second["end"] - second["start"])
    assert 0.6 <= seconds < 30
    assert 2 <= len(second["load_samples"]) <= 10 * seconds
    assert second["start"] >= now and {"load_before", "load_after"} <= set(second)
    timing = effect_study.timing_of(str(run_dir))
    assert timing["seconds"] == pytest.approx(60 + seconds)
    assert (timing["sittings"], timing["start"], timing["end"]) == (
        2, now - 100, second["end"])
    assert timing["load"] == [1.5, second["load_before"], second["load_after"]]
    assert timing["load_samples"] == second["load_samples"]
    # Reused now: no third sitting.
    assert effect_study.train(args, job, make_command) == (str(run_dir), None)
    assert len(effect_study.read_sittings(str(run_dir))) == 2


def test_one_sitting_timing_of_earlier_versions_reads_as_one_sitting(tmp_path):
    import effect_study

    (tmp_path / "study_timing.json").write_text(json.dumps(
        {"seconds": 10.0, "start": 5.0, "end": 15.0, "load_before": 1.0,
         "load_after": 2.0}))
    assert effect_study.read_sittings(str(tmp_path)) == [
        {"start": 5.0, "end": 15.0, "load_before": 1.0, "load_after": 2.0}]


def test_timing_sentence_sums_sittings_and_reports_the_sampled_load():
    import types

    import effect_study

    args = types.SimpleNamespace(workers=2, threads=1)
    records = [
        {"seconds": 100.0, "sittings": 2, "start": 0.0, "end": 400.0, "load": [1.0, 2.0],
         "load_samples": [4.0, 6.5, 5.0], "reused": True},
        {"seconds": 50.0, "sittings": 1, "start": 10.0, "end": 60.0, "load": [0.5],
         "load_samples": [], "reused": False},
    ]
    sentence = effect_study.timing_sentence(args, records, 1.5)
    assert "2 finished runs (1 reused" in sentence
    assert "first start to last end 6.7 min wall" in sentence
    assert "one run 50–100 s wall" in sentence
    assert "1 run(s) trained over more than one sitting" in sentence
    assert ("load average 0.5–2.0 at the runs' starts and ends and 4.0–6.5 (median 5.0) "
            "in 3 samples while 1 of the runs trained") in sentence
