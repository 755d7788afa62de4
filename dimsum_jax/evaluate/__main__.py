"""python -m dimsum_jax.evaluate --samples=OUT/samples.npz --reference=REF.npz --inception=W.pth

See dimsum_jax/evaluate/command.py for the options, the output and the refusals.
"""

from dimsum_jax.evaluate.command import cli

if __name__ == "__main__":
  cli()
