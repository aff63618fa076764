"""Does building the encoder as ModernBERT is (so `to-hf` exports it as stock ModernBertForMaskedLM) cost quality?

Pretrains recipes/configs/pretrain_encoder_nano_cpu.yaml with its earlier switches (RMSNorm, GeGLU, QK-norm,
grouped keys) and with the ModernBERT switches it now has (LayerNorm, GeGLU with exact GELU, an embedding norm,
the masked-LM head transform, one key/value head per query head) for the same steps on the same data, both with
the AdamW settings the recipe had when this was measured, and compares the held-out masked-token loss at each
evaluation. Quality is a loss at equal steps, not a time, so the numbers do not depend on load; the
wall times do.

    python benchmarks/bench_encoder_preset.py --max_steps=500

Writes results/encoder_preset_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import available_cores, cpu_model_name, save_record  # noqa: E402
from modeling import EmberConfig, EmberForMaskedLM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CONFIG = REPO_ROOT / "recipes" / "configs" / "pretrain_encoder_nano_cpu.yaml"
VARIANTS = {
    "recipe (rmsnorm, geglu tanh, qk_norm, 4 kv heads)": "{mlp_type: geglu, qk_norm: true}",
    "modernbert (layernorm, geglu, embedding norm, head transform, 8 kv heads)":
        "{mlp_type: geglu, hidden_act: gelu, norm_type: layernorm, embedding_norm: true, mlm_head_transform: true, "
        "num_key_value_heads: 8}",
}
ADAMW = ["--optimizer=adamw", "--learning_rate=2e-3"]  # the recipe's optimizer when the table was measured
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "outputs" / "bench_encoder_preset")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "encoder_preset_cpu.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    data = args.workdir / "data"
    if not (data / "tokenizer").is_dir():
        subprocess.run([sys.executable, "-m", "data_prep", "run", "--config",
                        str(REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml"), f"--output_dir={data}",
                        "--tokenizer.mask_token=true", "--pack.seq_len=256", "--workers=2"],
                       check=True, cwd=REPO_ROOT, env=ENV)
    runs = {}
    for index, (name, overrides) in enumerate(VARIANTS.items()):
        out = args.workdir / f"run{index}"
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO_ROOT / "recipes" / "pretrain.py"), "--config", str(CONFIG),
                        f"--data_dir={data}", f"--output_dir={out}", f"--model_overrides={overrides}",
                        f"--max_steps={args.max_steps}", f"--warmup_steps={max(1, args.max_steps // 20)}",
                        f"--eval_steps={max(1, args.max_steps // 5)}", "--save_strategy=no",
                        *ADAMW],
                       check=True, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL)
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        config = json.loads((out / "config.json").read_text())

        parameters = sum(p.numel() for p in EmberForMaskedLM(EmberConfig(**{
            k: v for k, v in config.items() if k in EmberConfig.__dataclass_fields__})).parameters())
        runs[name] = {"overrides": overrides, "parameters": parameters, "wall_seconds": time.perf_counter() - start,
                      "eval_loss": {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}}
        print(name, runs[name]["eval_loss"], flush=True)
    names = list(runs)
    final = {name: runs[name]["eval_loss"][max(runs[name]["eval_loss"])] for name in names}
    machine = {"cpu": cpu_model_name(), "cores": available_cores()}
    save_record("bench_encoder_preset", RESULTS_DIR, args.output, argv, machine, load_before, os.getloadavg(),
                max_steps=args.max_steps, runs=runs, final_eval_loss=final,
                modernbert_minus_recipe=final[names[1]] - final[names[0]])
    rows = ["| encoder | parameters | " + " | ".join(f"eval loss @ {s}" for s in runs[names[0]]["eval_loss"])
            + " | wall |", "|---|---|" + "---|" * len(runs[names[0]]["eval_loss"]) + "---|"]
    for name in names:
        losses = " | ".join(f"{v:.4f}" for v in runs[name]["eval_loss"].values())
        rows.append(f"| {name} | {runs[name]['parameters']:,} | {losses} | {runs[name]['wall_seconds']:.0f} s |")
    args.output.with_suffix(".md").write_text(
        f"# Encoder preset: the recipe's against ModernBERT's switches ({args.max_steps} steps, same data)\n\n"
        f"Held-out masked-token loss (nats); machine: {machine['cpu']}, {machine['cores']} cores; load average "
        f"{load_before[0]:.2f} before. Command: `python benchmarks/bench_encoder_preset.py "
        f"--max_steps={args.max_steps}`\n\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
