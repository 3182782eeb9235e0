"""Tests for bench/ablation.py: the --quick smoke run end to end, the variants, the budget, the summary."""
import importlib.util
import json
import sys
import warnings

import pytest

import data
import maris
import train
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import ablation  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.filterwarnings("ignore:MARIS. RANDOM weights")
def test_quick_run_prints_the_table_and_writes_json_and_chart(tmp_path, capsys, monkeypatch):
    """`--quick --jobs 2` trains two variants in two worker processes through train.main and reports their val
    metrics, trainable parameters and seconds in the printed table and ablation.json (and ablation.png with
    matplotlib); a second call reads the finished runs' result.json instead of training again."""
    out = tmp_path / "ablation"
    args = ["--quick", "--variants", "maris", "no_fusion", "--out", str(out)]
    report = ablation.main([*args, "--jobs", "2"])
    printed = capsys.readouterr().out
    assert [r["variant"] for r in report["variants"]] == ["maris", "no_fusion"]
    for row in report["variants"]:
        run = json.loads((out / "runs" / row["variant"] / "seed0" / "result.json").read_text())
        assert row["seeds"] == 1 and row["steps"] == run["step"] == 2 and row["oIoU_std"] is None
        assert row["oIoU"] == pytest.approx(100 * run["oIoU"]) and row["mIoU"] == pytest.approx(100 * run["mIoU"])
        assert run["count"] == 8 and run["seconds"] > 0 and run["cpu_seconds"] > 0
        assert "val oIoU" in (out / "runs" / row["variant"] / "seed0" / "train.log").read_text()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = maris.build_maris(maris.make_config("tiny", **dict(s.split("=") for s in row["switches"])))
        assert row["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert f"{row['trainable']:,d}" in printed
    assert report["table"] in printed
    assert json.loads((out / "ablation.json").read_text())["variants"] == json.loads(json.dumps(report["variants"]))
    assert (out / "ablation.png").is_file() == HAS_MATPLOTLIB
    assert ("pip install matplotlib" in printed) != HAS_MATPLOTLIB

    def no_training(argv):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "main", no_training)
    again = ablation.main(args)
    assert [r["oIoU"] for r in again["variants"]] == [r["oIoU"] for r in report["variants"]]
    assert capsys.readouterr().out.count("done earlier") == 2


def test_result_made_with_other_settings_is_refused(tmp_path):
    """A result.json whose train.py flags differ from this call's stops the script with one line naming it."""
    path = tmp_path / "runs" / "maris" / "seed0" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"argv": ["--seed", "0", "--max-steps", "9"]}))
    with pytest.raises(SystemExit, match="result.json was made with other settings"):
        ablation.main(["--quick", "--variants", "maris", "--out", str(tmp_path)])


def test_each_variant_is_one_single_change_of_maris():
    """Every variant but MARIS changes exactly one MarisConfig field from the default through --model-set,
    each switch value occurs once, and MARIS changes none."""
    base = train.model_config(train.resolve_options(train.TrainOptions()))
    changed = {}
    for name, (switches, _) in ablation.VARIANTS.items():
        config = train.model_config(train.resolve_options(train.TrainOptions(model_set=switches)))
        changed[name] = {k: v for k, v in config.items() if base[k] != v}
    assert changed.pop("maris") == {}
    assert all(len(c) == 1 for c in changed.values()), changed
    values = [tuple(c.items())[0] for c in changed.values()]
    assert len(set(values)) == len(values)
    assert {v for k, v in values if k == "fusion"} == set(maris.FUSIONS) - {"mutual"}
    assert {v for k, v in values if k == "query_token"} == set(maris.QUERY_TOKENS) - {"multimodal"}
    assert ("feature_enhancement", False) in values
    K = maris.MarisConfig.maa_depth
    assert {v for k, v in values if k == "maa_depth"} == {K - 1, K + 1}


def test_step_budget_spans_the_whole_epochs_that_hold_it(capsys):
    """--steps N trains N steps with a schedule over ceil(N / steps per epoch) epochs; a budget that is not a
    whole number of epochs says that the schedule stops before it has decayed."""
    args = ablation.parse_args(["--quick"])  # 8 training items, batch 4: 2 steps per epoch
    flags, budget = ablation.budget_args(args)
    assert flags[-4:] == ["--epochs", "1", "--max-steps", "2"] and budget["steps_per_epoch"] == 2
    assert "note" not in capsys.readouterr().out
    args.steps = 5
    flags, budget = ablation.budget_args(args)
    assert flags[-4:] == ["--epochs", "3", "--max-steps", "5"] and budget["epochs"] == 3
    assert "stops before it has decayed" in capsys.readouterr().out
    args.steps = 0  # the demo's own schedule: no budget flags
    flags, budget = ablation.budget_args(args)
    assert "--max-steps" not in flags and budget["epochs"] == train.resolve_options(train.TrainOptions()).epochs


def test_step_budget_counts_the_runs_own_steps_per_epoch(monkeypatch):
    """The budget's steps per epoch are those of the run train.py builds from the same flags, whose training
    split has --train-scenes scenes (not the generator's default count)."""
    monkeypatch.setitem(ablation.QUICK, "extra", ["--image-size", "32", "--train-scenes", "12", "--batch-size", "4"])
    _, budget = ablation.budget_args(ablation.parse_args(["--quick", "--steps", "3"]))
    opts = train.resolve_options(maris.parse_options(train.TrainOptions, ablation.QUICK["extra"], "")[0])
    train_set, _ = train.build_data(opts, train.model_config(opts))
    assert len(train_set.scenes) == 12
    batches = train.epoch_batches(len(train_set), batch_size=4, seed=opts.seed, epoch=0, rank=0, world=1,
                                  image_ids=list(train_set.image_ids), sentences_per_image=opts.sentences_per_image)
    assert budget["steps_per_epoch"] == len(batches)


def test_train_flags_reach_every_run_and_the_budget(capsys):
    """--train-flags are train.py options for every run, and the step budget counts the epochs of the
    training split they make (here 1 scene, fewer sentences than --quick's 8 items)."""
    args = ablation.parse_args(["--quick", "--train-flags", "--train-scenes 1 --sentences-per-image 1"])
    flags, budget = ablation.budget_args(args)
    assert flags[:-4] == [*ablation.QUICK["extra"], "--train-scenes", "1", "--sentences-per-image", "1"]
    items = len(data.build_dataset("shapes", "train", image_size=32, num_images=1, load_images=False,
                                   load_masks=False))
    assert items < 8 and budget["steps_per_epoch"] == items // 4  # full batches of 4 (8 items: 2)


def test_summary_is_mean_and_sample_std_over_seeds_in_percent():
    """A variant's row holds the mean and the sample standard deviation (n - 1) over its seeds, in percent."""
    runs = [{"oIoU": v, "mIoU": v / 2, "Prec@0.5": 0.5, "seconds": 10.0, "cpu_seconds": 20.0, "trainable": 7,
             "step": 3} for v in (0.4, 0.5, 0.6)]
    row = ablation.summarise("maris", runs)
    assert row["oIoU"] == pytest.approx(50) and row["oIoU_std"] == pytest.approx(10)
    assert row["mIoU"] == pytest.approx(25) and row["mIoU_std"] == pytest.approx(5)
    assert row["Prec@0.5_std"] == pytest.approx(0) and row["oIoU_per_seed"] == pytest.approx([40, 50, 60])
    assert ablation.summarise("maris", runs[:1])["oIoU_std"] is None


def test_unknown_variant_is_refused(capsys):
    """An unknown --variants name stops with the list of known ones."""
    with pytest.raises(SystemExit):
        ablation.parse_args(["--variants", "maris", "mutal"])
    assert "unknown variant(s) mutal" in capsys.readouterr().err
