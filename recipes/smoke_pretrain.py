"""Offline pretraining smoke run: a nano Ember model learns Python from the running interpreter.

Reads the standard library's `.py` sources (present on every Python install, so no network is
needed), byte-tokenises them (ids 0-255, plus bos/eos/pad), trains the `nano` preset for a few
hundred steps on 2 CPU cores, reports held-out bits per byte before and after, saves a Hub-style
checkpoint, reloads it through `AutoModelForCausalLM` and samples from it.

    python recipes/smoke_pretrain.py [--steps 200] [--output-dir outputs/smoke]
"""

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from modeling import EmberConfig, EmberForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
BOS, EOS, PAD = 256, 257, 258


def read_stdlib_bytes(max_bytes: int) -> list[bytes]:
    """Source files of the interpreter's standard library, in a fixed order, up to `max_bytes`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        if data.strip():
            documents.append(data)
            total += len(data)
        if total >= max_bytes:
            break
    if not documents:
        raise SystemExit(f"error: no Python sources found under {stdlib}")
    return documents


def pack(documents: list[bytes], block: int) -> torch.Tensor:
    """Concatenate `<bos> doc <eos>` streams and cut them into rows of `block` tokens."""
    stream = []
    for doc in documents:
        stream.extend([BOS, *doc, EOS])
    rows = len(stream) // block
    return torch.tensor(stream[: rows * block], dtype=torch.long).view(rows, block)


@torch.no_grad()
def bits_per_byte(model: EmberForCausalLM, rows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(input_ids=rows[i : i + batch_size], labels=rows[i : i + batch_size]).loss.item()
              for i in range(0, len(rows), batch_size)]
    model.train()
    return sum(losses) / len(losses) / math.log(2)  # one token is one byte


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "smoke")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rows = pack(read_stdlib_bytes(args.max_bytes), args.seq_len)
    rows = rows[torch.randperm(len(rows))]
    held_out, train = rows[:32], rows[32:]
    print(f"data: {rows.numel():,} byte tokens in {len(rows)} rows of {args.seq_len} ({len(held_out)} held out)")

    config = EmberConfig.from_preset(
        "nano", vocab_size=260, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        max_position_embeddings=args.seq_len,
    )
    model = EmberForCausalLM(config).train()
    print(f"model: nano preset, {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)

    def warmup_then_cosine_to_10_percent(step: int) -> float:
        progress = min(step, args.steps) / args.steps
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine_to_10_percent)

    bpb_before = bits_per_byte(model, held_out, args.batch_size)
    history, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = train[(step * args.batch_size + torch.arange(args.batch_size)) % len(train)]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.1f}s", flush=True)
    elapsed = time.perf_counter() - start
    bpb_after = bits_per_byte(model, held_out, args.batch_size)
    print(f"held-out bits/byte: {bpb_before:.3f} -> {bpb_after:.3f}  ({elapsed:.0f}s of training)")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    prompt = torch.tensor([[BOS, *b"def "]])
    sample = reloaded.generate(prompt, max_new_tokens=80, do_sample=True, top_k=20, temperature=0.8)
    text = bytes(t for t in sample[0, 1:].tolist() if t < 256).decode("utf-8", errors="replace")
    print("sample from the reloaded checkpoint:\n" + text)

    report = dict(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, train_seconds=elapsed,
                  held_out_bpb_before=bpb_before, held_out_bpb_after=bpb_after, losses=history)
    (args.output_dir / "smoke_report.json").write_text(json.dumps(report, indent=2))
    if not bpb_after < bpb_before:
        raise SystemExit("error: held-out bits/byte did not fall; training is broken")


if __name__ == "__main__":
    main()
