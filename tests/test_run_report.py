"""The end-of-run report (plots + report.md) and the model card, from synthetic Trainer logs."""

import math
import socket

import numpy as np
import pytest
from huggingface_hub import ModelCard
from matplotlib.image import imread

from evaluation.perplexity import perplexity
from modeling import sizing
from reporting.model_card import write_model_card
from reporting.run_report import FIGURE_DPI, FIGURE_SIZE_INCHES, PLOTS, run_statistics, write_run_report
from tests.conftest import tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {plot.file for plot in PLOTS if not plot.optional}  # optional ones: only for runs that log them
WALL_SECONDS, ESTIMATED_SECONDS = 321.5, 300.0
ESTIMATED_MEMORY_GB = 1.2


def make_log_history(with_mfu: bool = True, with_eval: bool = True, steps: int = 200) -> list[dict]:
    """What `trainer.state.log_history` holds after the recipe: logs every 10 steps, evals every 100, a summary."""
    history = []
    for step in range(10, steps + 1, 10):
        entry = {
            "loss": 3.0 + 8.0 * math.exp(-step / 60), "grad_norm": 2.0 / (1 + step / 40),
            "learning_rate": 2e-3 * min(1.0, step / 20), "epoch": step / steps,
            "tokens_per_s": 5000.0 + 7 * step, "tflops_per_device": 0.8 + step / 1000,
            "peak_memory_gb": 1.5 + step / 1000, "skipped_steps": 2 if step > 150 else 0, "step": step,
        }
        if with_mfu:
            entry["mfu"] = 0.30 + step / 2000
        history.append(entry)
        if with_eval and step % 100 == 0:
            eval_loss = 3.3 + 8.0 * math.exp(-step / 60)
            history.append({"eval_loss": eval_loss, "eval_bits_per_byte": eval_loss / math.log(2) / 4.0,
                            "eval_runtime": 1.5, "eval_samples_per_second": 40.0, "epoch": step / steps, "step": step})
    history.append({"train_runtime": WALL_SECONDS, "train_samples_per_second": 5.0, "train_steps_per_second": 0.62,
                    "total_flos": 1e12, "train_loss": 4.4321, "epoch": 1.0, "step": steps})
    if with_eval:  # the recipe's trainer.evaluate() after train()
        history.append({"eval_loss": 3.2468, "eval_bits_per_byte": 3.2468 / math.log(2) / 4.0, "eval_runtime": 1.5,
                        "epoch": 1.0, "step": steps})
    return history


SUMMARY = {"config": {"preset": "nano", "learning_rate": 2e-3, "schedule": "cosine", "model_overrides": {"a": 1}},
           "tokens_per_step": 4096, "estimated_seconds": ESTIMATED_SECONDS, "estimated_memory_gb": ESTIMATED_MEMORY_GB,
           "device": "cuda"}


def assert_real_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    pixels = imread(path)
    width, height = (round(inches * FIGURE_DPI) for inches in FIGURE_SIZE_INCHES)
    assert pixels.shape[:2] == (height, width), path
    rgb = pixels[..., :3]
    drawn = (rgb < 0.9).any(axis=-1).mean()  # text, axes and curves on a white background
    assert 0.01 < drawn < 0.5, (path, drawn)
    # The first curve's colour (matplotlib's default blue, #1f77b4) is there: a line was drawn, not just axes.
    blue = np.array([0x1F, 0x77, 0xB4]) / 255
    assert (np.abs(rgb - blue).max(axis=-1) < 0.05).sum() > 50, path


def test_report_has_every_plot_and_the_numbers(tmp_path):
    history = make_log_history()
    report = write_run_report(tmp_path, history, SUMMARY)
    assert report == tmp_path / "run_report" / "report.md"
    text = report.read_text()

    for file in sorted(ALL_PLOTS):
        assert_real_png(tmp_path / "run_report" / file)
        assert f"]({file})" in text
    last_train = [entry for entry in history if "loss" in entry][-1]
    medians = {key: float(np.median([entry[key] for entry in history if key in entry]))
               for key in ("tokens_per_s", "mfu")}
    for expected in (
        f"| Final training loss | {last_train['loss']:.4f} |",
        f"| Final training perplexity | {math.exp(last_train['loss']):.2f} |",
        "| Final eval loss | 3.2468 |",  # the evaluation after train(), not the last one during it
        f"| Final eval perplexity | {math.exp(3.2468):.2f} |",
        "| Mean training loss over the run | 4.4321 |",
        "| Optimizer steps | 200 |",
        "| Tokens seen | 819,200 (from tokens_per_step x steps) |",
        f"| Throughput, median (tokens/s) | {medians['tokens_per_s']:,.0f} |",
        f"| MFU, median | {medians['mfu']:.1%} |",
        "| Peak memory per process (GiB; host RSS on CPU) | 1.70 |",
        "| Skipped steps (non-finite gradients) | 2 |",
        f"| {WALL_SECONDS / ESTIMATED_SECONDS:.2f} |",
        f"| {1.7 / ESTIMATED_MEMORY_GB:.2f} |",
        sizing.format_duration(ESTIMATED_SECONDS),
        "| model_overrides | {\"a\": 1} |",
        "| schedule | cosine |",
    ):
        assert expected in text, expected
    assert "not plotted" not in text and "Not recorded" not in text


def test_on_the_cpu_host_memory_is_not_set_against_the_gpu_estimate(tmp_path):
    text = write_run_report(tmp_path, make_log_history(), {**SUMMARY, "device": "cpu"}).read_text()
    assert f"| {1.7 / ESTIMATED_MEMORY_GB:.2f} |" not in text  # no ratio of host RSS to a GPU estimate
    assert "| Peak memory per device (GiB) |" not in text
    assert f"the estimate ({ESTIMATED_MEMORY_GB:.2f} GiB per GPU) is for GPU training" in text
    assert f"| {WALL_SECONDS / ESTIMATED_SECONDS:.2f} |" in text  # the time estimate still applies


@pytest.mark.parametrize("objective,scored", [("mlm", " of the masked tokens"), ("prefix_lm", " of the suffix tokens"),
                                               ("ul2", " of the target tokens")])
def test_the_loss_rows_say_which_tokens_an_objective_scores(tmp_path, objective, scored):
    text = write_run_report(tmp_path, make_log_history(), {**SUMMARY, "objective": objective}).read_text()
    for label in ("Final training loss", "Final training perplexity", "Mean training loss over the run",
                  "Final eval loss", "Final eval perplexity"):
        assert f"| {label}{scored} |" in text, label
    assert "| Final eval perplexity |" not in text


def test_every_objective_has_its_label_and_an_unknown_one_is_refused(tmp_path):
    from reporting.run_report import SCORED_TOKENS
    from training.objectives import OBJECTIVES

    assert sorted(SCORED_TOKENS) == sorted(OBJECTIVES)
    plain = write_run_report(tmp_path / "clm", make_log_history(), SUMMARY).read_text()
    assert "| Final eval perplexity |" in plain
    with pytest.raises(ValueError, match="objective: expected one of clm, prefix_lm, ul2, mlm, got 'bert'"):
        write_run_report(tmp_path / "bad", make_log_history(), {**SUMMARY, "objective": "bert"})


def test_missing_mfu_and_eval_are_left_out_with_a_note(tmp_path):
    write_run_report(tmp_path, make_log_history(), SUMMARY)  # an earlier run into the same folder
    text = write_run_report(tmp_path, make_log_history(with_mfu=False, with_eval=False),
                            {"tokens_seen": 12345}).read_text()

    report_dir = tmp_path / "run_report"
    assert not (report_dir / "mfu.png").exists()  # the earlier run's plot is gone, not shown as this run's
    assert "mfu.png" not in text and not (report_dir / "bits_per_byte.png").exists()
    assert "Held-out bits per byte: not plotted, no finite `eval_bits_per_byte` in the logs" in text
    for file in sorted(ALL_PLOTS - {"mfu.png", "bits_per_byte.png"}):
        assert_real_png(report_dir / file)
        assert f"]({file})" in text
    assert "Model FLOPs utilisation: not plotted, no finite `mfu` in the logs" in text
    assert "Loss: no `eval_loss` in the logs, so the eval curve is omitted." in text
    assert "- Final eval loss: no evaluation in the logs." in text
    assert "- MFU, median: no `mfu` in the logs" in text
    assert "Wall time: no estimate given." in text
    assert "| Tokens seen | 12,345 |" in text
    assert "No recipe configuration was given." in text


def test_non_finite_and_empty_logs_do_not_crash(tmp_path):
    history = make_log_history(with_eval=False)
    history[3]["loss"] = float("nan")
    history[4]["grad_norm"] = float("inf")
    text = write_run_report(tmp_path / "a", history, {}).read_text()
    assert "| Training logs with a non-finite loss | 1 |" in text
    assert "Loss: 1 non-finite `loss` value(s) not drawn." in text
    assert "Gradient norm: 1 non-finite `grad_norm` value(s) not drawn." in text
    assert_real_png(tmp_path / "a" / "run_report" / "grad_norm.png")

    text = write_run_report(tmp_path / "b", [], {}).read_text()
    assert "No metric in the logs could be plotted." in text
    assert not list((tmp_path / "b" / "run_report").glob("*.png"))


def test_run_statistics_sources():
    history = make_log_history()
    history[-3]["num_input_tokens_seen"] = 777  # the Trainer's own count wins over tokens_per_step x steps
    stats = run_statistics(history, {"tokens_per_step": 4096})
    assert (stats["tokens_seen"], stats["tokens_seen_source"]) == (777, "num_input_tokens_seen")
    assert stats["wall_seconds"] == WALL_SECONDS and stats["time_ratio"] is None
    assert run_statistics(history, {"tokens_seen": 5})["tokens_seen"] == 5
    assert run_statistics([], {})["steps"] is None
    assert perplexity(1000.0) == math.inf and perplexity(None) is None and math.isnan(perplexity(math.nan))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("huggingface_hub.repocard.hf_hub_download", refuse)


TRAINING = {"tokens": 819200, "steps": 200, "tokens_per_step": 4096, "learning_rate": 2e-3,
            "lr_schedule": "cosine to 0.1 x peak", "world_size": 2, "hardware": "2 x CPU", "wall_seconds": WALL_SECONDS}


def test_model_card_metadata_and_body(tmp_path, no_network):
    config = tiny_config()
    write_run_report(tmp_path, make_log_history(), SUMMARY)
    path = write_model_card(tmp_path, model_name="ember-tiny", config=config, datasets=["stdlib"],
                            metrics={"eval_loss": 3.2468, "train_loss": 4.4321}, training=TRAINING,
                            repo_id="org/ember-tiny")
    assert path == tmp_path / "README.md"

    card = ModelCard.load(path)
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["ember", "llama-style", "pretraining", "text-generation"]
    assert card.data.datasets == ["stdlib"]
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation"
    results = {result.metric_type: result for result in card.data.eval_results}
    assert results["perplexity"].metric_value == pytest.approx(math.exp(3.2468), abs=1e-3)
    assert results["loss"].metric_value == pytest.approx(3.2468)
    assert results["loss"].dataset_split == "validation"

    body = card.text
    assert 'AutoModelForCausalLM.from_pretrained("org/ember-tiny", trust_remote_code=True)' in body
    assert "python -m modeling.convert to-hf org/ember-tiny" in body
    assert f"({sizing.count_parameters(config):,})" in body
    assert "| Attention heads / KV heads | 4 / 2 (grouped-query), head dim 16 |" in body
    assert "| Layers | 2 |" in body and "| Context length | 256 |" in body and "| Vocabulary | 128 |" in body
    assert "| Tokens seen | 819K (819,200) |" in body and "| Devices (world size) | 2 |" in body
    assert "| Cross-entropy (nats/token) | 3.2468 |" in body
    assert "](run_report/loss.png)" in body and "](run_report/report.md)" in body


def test_model_card_from_a_config_dict_without_evaluation(tmp_path, no_network):
    config = tiny_config(num_key_value_heads=1)
    path = write_model_card(tmp_path, model_name="bare", config=config.to_dict(), datasets=[], metrics={},
                            training={}, license="mit")
    card = ModelCard.load(path)
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert not card.data.datasets and not card.data.eval_results
    assert "No held-out evaluation was run." in card.text
    assert "No training details were recorded." in card.text
    assert "(multi-query)" in card.text
    assert f"({sizing.count_parameters(config):,})" in card.text
    assert "run_report" not in card.text


def test_batch_ramp_z_loss_and_rollbacks_get_their_plots_and_section(tmp_path):
    history = make_log_history(with_eval=False)
    for entry in history:
        if "loss" in entry and "step" in entry:
            entry["batch_tokens"] = min(4096, 512 * (1 + entry["step"] // 20))
            entry["z_loss"] = 30.0 - entry["step"] / 20
    rollback = {"rollback": 1, "spike_step": 120, "loss": 9.5, "window_mean": 4.1, "zscore": 31.0,
                "resumed_from_step": 100, "skipped_blocks": [[800, 840], [900, 901]], "decision": "skip",
                "screened_steps": [101, 130], "reference_block_loss": 4.05, "block_threshold": 5.25,
                "anomalous_blocks": 41, "top_block_loss": 9.9}
    shift = {**rollback, "rollback": 2, "spike_step": 150, "resumed_from_step": 140, "skipped_blocks": [],
             "decision": "shift", "why": "no block stands out", "anomalous_blocks": 0, "screened_steps": [141, 160],
             "top_block_loss": 5.1}
    text = write_run_report(tmp_path, history, {**SUMMARY, "rollbacks": [rollback, shift]}).read_text()
    for file in ("batch_size.png", "z_loss.png", "loss.png"):
        assert_real_png(tmp_path / "run_report" / file)
        assert f"]({file})" in text
    assert "## Loss spikes" in text
    assert ("| 1 | 120 | 9.5000 | 4.1000 | 31.0 | 100 | steps 101-130: threshold 5.2500 (median 4.0500), highest "
            "9.9000 | 41 bad blocks skipped | 800-839, 900-900 |") in text
    assert ("| 2 | 150 | 9.5000 | 4.1000 | 31.0 | 140 | steps 141-160: threshold 5.2500 (median 4.0500), highest "
            "5.1000 | a shift in the data (no block stands out): nothing skipped, spike test re-baselined | - |"
            ) in text
    # The rollback is a dashed red line on the loss plot: a column of red pixels a plot without it lacks.
    red = np.array([0xD6, 0x27, 0x28]) / 255
    marked = imread(tmp_path / "run_report" / "loss.png")[..., :3]
    write_run_report(tmp_path / "plain", make_log_history(with_eval=False), SUMMARY)
    plain = imread(tmp_path / "plain" / "run_report" / "loss.png")[..., :3]
    assert (np.abs(marked - red).max(axis=-1) < 0.05).sum() > 50
    assert (np.abs(plain - red).max(axis=-1) < 0.05).sum() == 0
    assert not (tmp_path / "plain" / "run_report" / "batch_size.png").exists()
    assert "batch_tokens" not in (tmp_path / "plain" / "run_report" / "report.md").read_text()  # no note either
