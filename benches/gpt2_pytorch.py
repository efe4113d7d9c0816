"""PyTorch eager baseline for `ferrotron run models/gpt2-small.ron`: one forward + backward step
of Hugging Face's GPT2LMHeadModel (GPT-2 small, random initialisation, nothing downloaded) on a
batch of random token ids. Run through benches/gpt2_vs_pytorch.sh, which makes the virtual
environment and sets the thread variables before torch starts.

Like ferrotron's graph, the model is in training mode (dropout 0.1 on the embeddings, the
attention probabilities and both residual branches) and the loss is the mean next-token
cross-entropy over the batch. Each timed step zeroes the gradients, runs the forward pass and the
loss, and the backward pass; 2 warm-up steps, then the median of 5.

Prints one JSON object: tokens_per_second, seconds_per_step (median), all step times, versions.

With --train, each step is a whole training step, as `ferrotron train` takes one: forward, loss,
backward, gradient clipping to norm 1 and torch.optim.AdamW (decoupled weight decay 0.1).

    python benches/gpt2_pytorch.py [--threads 2] [--batch 4] [--seq 128] [--warmup 2] [--runs 5]
                                   [--train]
"""

import argparse
import json
import os
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", action="store_true")
    args = ap.parse_args()

    # Before torch reads them (the shell script sets them too).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = GPT2Config()  # GPT-2 small: 12 layers, hidden 768, 12 heads, vocabulary 50,257
    model = GPT2LMHeadModel(config)
    model.train()  # dropout on, as in ferrotron's graph
    params = sum(p.numel() for p in model.parameters())

    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1) if args.train else None

    def step():
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        dt = time.perf_counter() - t
        return dt, loss.detach().item()

    for _ in range(args.warmup):
        step()
    times, losses = [], []
    for _ in range(args.runs):
        dt, loss = step()
        times.append(dt)
        losses.append(loss)
    median = statistics.median(times)
    tokens = args.batch * args.seq
    print(json.dumps({
        "implementation": "pytorch-eager",
        "step": "training (AdamW)" if args.train else "forward + backward",
        "tokens_per_second": tokens / median,
        "seconds_per_step": median,
        "step_seconds": times,
        "best_tokens_per_second": tokens / min(times),
        "loss": losses[-1],
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "seq": args.seq,
        "parameters": params,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6],
    }))


if __name__ == "__main__":
    main()
