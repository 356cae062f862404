"""Peer comparison: xlingo's train step vs a Hugging Face LlamaForCausalLM of the same size.

  .venv/bin/python bench/bench_peer.py [--steps 10 --warmup 3] [--peer_python .venv-bench/bin/python]

One run measures both, back to back on the same machine:
  xlingo: configs/small.py through bench_train.py's throughput mode (loop.build,
          step.make_train_step, the compiled step with the loop's shardings; real packed
          batches), in this process (the project's .venv).
  peer:   transformers.LlamaForCausalLM with identical dimensions (vocab 8192, d_model 512,
          4 layers, 8 heads x 64, SwiGLU MLP 2048, tied embeddings, float32), trained with
          torch.optim.AdamW (same lr, betas, weight decay) plus global-norm clipping at 1.0, on
          batches of 8 x 256 token ids, in a subprocess running ``--peer_python`` (a separate
          environment that has torch and transformers; the project's .venv does not):

            python3 -m venv .venv-bench && .venv-bench/bin/pip install torch transformers

Both report the median step time over ``--steps`` steps after ``--warmup`` steps; the ratio
is xlingo tokens/s / peer tokens/s. Differences that remain: xlingo adds a language
embedding and uses packed-segment masks (the peer uses a plain causal mask, SDPA attention).
Prints one JSON line with both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DIMS = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, head_dim=64, intermediate_size=2048, seq_len=256, batch=8)


def peer_worker(steps: int, warmup: int, threads: int) -> dict:
  """Runs inside the bench environment: the torch/transformers half."""
  import torch
  import transformers

  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  d = DIMS
  cfg = transformers.LlamaConfig(
      vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
      head_dim=d["head_dim"], max_position_embeddings=d["seq_len"], rms_norm_eps=1e-6,
      hidden_act="silu", tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
      torch_dtype=torch.float32)
  model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
  model.train()
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
  gen = torch.Generator().manual_seed(0)
  batches = [torch.randint(3, d["vocab_size"], (d["batch"], d["seq_len"]), generator=gen)
             for _ in range(4)]
  times = []
  loss = float("nan")
  for i in range(warmup + steps):
    ids = batches[i % len(batches)]
    t = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = float(out.loss.detach())
    if i >= warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  return {"torch": torch.__version__, "transformers": transformers.__version__,
          "threads": torch.get_num_threads(), "params_m": round(n_params / 1e6, 2),
          "attn_implementation": getattr(model.config, "_attn_implementation", None),
          "step_ms_median": round(step_s * 1e3, 2),
          "step_ms_all": [round(x * 1e3, 1) for x in times],
          "tokens_per_s": round(d["batch"] * d["seq_len"] / step_s), "loss": round(loss, 4)}


def run_peer(python: str, steps: int, warmup: int, threads: int) -> dict:
  cmd = [python, os.path.abspath(__file__), "--worker", "peer", "--steps", str(steps),
         "--warmup", str(warmup), "--threads", str(threads)]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
  if r.returncode or not lines:
    raise RuntimeError(f"peer run failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
  return json.loads(lines[-1])


def run_xlingo(steps: int, warmup: int) -> dict:
  sys.path.insert(0, HERE)
  import bench_train

  args = argparse.Namespace(config=os.path.join(ROOT, "configs", "small.py"), steps=steps,
                            warmup=warmup, matmul_n=0, matmul_repeats=5)
  cfg = bench_train.load_config(args.config, [])
  d = DIMS
  m = cfg.model
  assert (m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim,
          m.mlp_dim, cfg.data.seq_len, cfg.train.batch_size, m.tie_embeddings, m.dtype) == (
              d["vocab_size"], d["hidden_size"], d["num_hidden_layers"],
              d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"],
              d["intermediate_size"], d["seq_len"], d["batch"], True, "float32"), \
      "configs/small.py no longer matches the peer's dimensions"
  return bench_train.run_throughput(cfg, args)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  ap.add_argument("--peer_python", default=os.path.join(ROOT, ".venv-bench", "bin", "python"))
  ap.add_argument("--worker", choices=["peer"], help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker == "peer":
    out = peer_worker(args.steps, args.warmup, args.threads)
    print(json.dumps(out))
    return out
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if not os.path.exists(args.peer_python):
    sys.exit(f"{args.peer_python} not found: create the bench environment first\n"
             "  python3 -m venv .venv-bench && .venv-bench/bin/pip install torch transformers")
  xl = run_xlingo(args.steps, args.warmup)
  peer = run_peer(args.peer_python, args.steps, args.warmup, args.threads)
  ratio = xl["tokens_per_s"] / peer["tokens_per_s"]
  print(f"xlingo {xl['tokens_per_s']:,} tokens/s (median step {xl['step_ms_median']:.0f} ms); "
        f"HF Llama (torch {peer['torch']}, transformers {peer['transformers']}, "
        f"{peer['threads']} threads) {peer['tokens_per_s']:,} tokens/s (median step "
        f"{peer['step_ms_median']:.0f} ms); xlingo / peer = {ratio:.2f}")
  out = {"xlingo": xl, "peer": peer, "xlingo_over_peer": round(ratio, 3)}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
