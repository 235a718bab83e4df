"""A Transformer learns to sort, trained by hand-written backwards (minGPT's sorting demo).

A decoder-only Transformer (``jb.transformer``: embeddings, pre-LN blocks of multi-head causal
attention and a GELU MLP in ``lax.scan``, every module with its hand-written backward) reads six
digits in 0..4 and writes them sorted, one digit at a time. ``trainer.fit`` trains it with the
defaults of ``jbackprop train --model transformer`` (the same run as that command) and writes
``metrics.json`` and ``curves.png``; then the trained model *generates* the sorted digits of the
held-out sequences greedily, token by token, and the exact-sequence accuracy is measured again.

    python examples/transformer_sort.py                 # about a minute on 2 CPU cores
    python examples/transformer_sort.py --out runs/sort --epochs 30
"""
import argparse
import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jbackprop as jb
from jbackprop.train import data, trainer
from jbackprop.train.loop import TRANSFORMER_DEFAULTS, Config

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--epochs", type=int, default=TRANSFORMER_DEFAULTS["epochs"])
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
args = parser.parse_args()

cfg = dataclasses.replace(Config(model="transformer", input_noise=0.0, seed=args.seed),
                          **{**TRANSFORMER_DEFAULTS, "epochs": args.epochs})
out = args.out or tempfile.mkdtemp(prefix="transformer-sort-")
metrics = trainer.fit(cfg, out, progress=False, overwrite=True)
final = metrics["final"]
print(f"{cfg.epochs} epochs in {metrics['seconds_total']:.0f} s: train loss "
      f"{final['train_loss']:.4f}, held-out exact-sequence accuracy (teacher forcing) "
      f"{100 * final['test_accuracy']:.2f} %")
print(f"metrics: {os.path.join(out, 'metrics.json')}\ncurves:  {os.path.join(out, 'curves.png')}")

# Generation: feed the six digits, then each predicted digit back in, greedily.
state, _, _ = trainer.load_checkpoint(os.path.join(out, trainer.CHECKPOINT))
params = state.params
ds = data.sort()
length = (ds.x_test.shape[1] + 1) // 2


@jax.jit
def generate(prompt):
    """The sorted digits of ``prompt (length,)``, each predicted from the prompt and the
    digits predicted before it (the buffer's later slots are not seen: the mask is causal)."""
    seq = jnp.concatenate([prompt, jnp.zeros(length, prompt.dtype)])   # one slot spare

    def step(i, seq):                  # the model reads the first 2·length − 1 tokens
        digit = jnp.argmax(jb.transformer(params, seq[:-1])[length - 1 + i])
        return jax.lax.dynamic_update_index_in_dim(seq, digit.astype(seq.dtype), length + i, 0)
    return jax.lax.fori_loop(0, length, step, seq)[length:]


prompts = jnp.asarray(ds.x_test[:, :length])
generated = np.asarray(jax.vmap(generate)(prompts))
exact = np.mean(np.all(generated == np.sort(ds.x_test[:, :length], axis=1), axis=1))
print(f"greedy generation on the {len(prompts)} held-out sequences: {100 * exact:.2f} % sorted "
      f"exactly, e.g. {ds.x_test[0, :length].tolist()} -> {generated[0].tolist()}")
assert final["test_accuracy"] >= 0.99 and exact >= 0.99, (final["test_accuracy"], exact)
