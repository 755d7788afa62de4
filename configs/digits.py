"""Class-conditional DiMSUM on the offline digits set (scikit-learn's 8x8 digits, upscaled).

  python -m dimsum_jax.main --config=configs/digits.py --workdir=runs/digits

A tiny DiMSUM-L/4 (depth 4, hidden 64, 0.54 M parameters) on 16x16 digits, batch 64, 2 000 steps,
no network needed. On 2 CPU cores: 20-25 s to compile, 4.9 steps/s, 7.5 minutes in all (10-13
when the cores are shared with other jobs); final loss 0.266 (the run is deterministic).
WORKDIR/samples/ema_00001000.png and ema_00002000.png hold 10 x 10 EMA samples with guidance 3,
one digit class per row (0 at the top to 9 at the bottom): 0-6 readable at step 1 000, all ten at
step 2 000.

Evaluation during training (config.eval, dimsum_jax.evaluate.training): every 250 steps, 1 000
unguided EMA samples (Euler, 10 steps) scored with the digits features against all 1 797 digits,
as eval/fid, eval/precision, eval/recall and eval/accuracy in metrics.jsonl; the checkpoint of
the lowest FID is kept. Measured (2 CPU cores shared with other jobs, where the whole run took 20
minutes): FID-like distance 1227, 248, 158, 49.6, 13.9, 8.09, 7.21, 6.66 at steps 250 to 2 000;
sample accuracy 0.09 at step 250, 0.52 at 1 000, 0.90 at 2 000; 9-13 s per evaluation and 14 s
to compile its sampler, 102 s in all. The grid's guidance 3 would hide the progress: at step
2 000 it gives FID 166 at accuracy 0.999 (scale 1.5: 36; 2: 83).

DiM variant: `python -m dimsum_jax.main --config=configs/digits.py:dim --workdir=runs/digits_dim`
trains a DiM (depth 3, hidden 64, 0.15 M parameters) with DiM's discrete noise-prediction
objective on the native 8x8 digits, 2 500 steps. Measured on 2 CPU cores shared with other
jobs: 40 minutes (0.7 to 1.9 steps/s with the load; about 23 minutes at 1.9), final loss 0.105;
at step 2 500 all ten rows read as their class (the 8s the faintest). The selective scan's CPU
reference takes most of each step: DiM pads a 4x4 token grid to a 54-token sequence.

Resolution (README, Resolution): after the default run,
`python -m dimsum_jax.main --config=configs/digits.py:finetune32 --workdir=runs/digits32`
fine-tunes its weights on 32x32 digits for 600 steps (loss at step 0: 0.73, a fresh model's
1.94 on the same batch; final 0.173). Measured on 2 CPU cores shared with other jobs: 29
minutes, compile 52 s, 0.47 steps/s (the default run took 27.5 minutes under the same load); at
step 600 all ten rows read as their class, and a digits classifier reads 85.5 % of 200 samples
(Euler 50, guidance 3) as the class asked for.

Smoke variants for tests (seconds on CPU), a DiMSUM of depth 4 and hidden 64 and a DiT of the
same size on 8x8 inputs:

  python -m dimsum_jax.main --config=configs/digits.py:smoke --workdir=runs/smoke
  python -m dimsum_jax.main --config=configs/digits.py:smoke_dit --workdir=runs/smoke_dit
"""

from dimsum_jax import config_utils

VARIANTS = ('', 'smoke', 'smoke_dit', 'dim', 'finetune32')


def get_config(arg=''):
  config_utils.check_variant(arg, VARIANTS, 'configs/digits.py')
  c = config_utils.base_config()
  c.data.name = 'digits'
  c.data.image_size = 16
  c.data.channels = 1
  c.data.global_batch_size = 64

  c.model.name = 'DiMSUM-L/4'
  c.model.depth = 4
  c.model.hidden_size = 64
  c.model.input_size = 16
  c.model.in_channels = 1
  c.model.num_classes = 10
  c.model.label_dropout = 0.1
  c.model.remat = 'none'  # tiny activations: nothing to recompute

  c.num_train_steps = 2000
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = 'cosine'  # down to end_learning_rate at the last step
  c.optim.end_learning_rate = 1e-5
  c.optim.ema_decay = 0.995  # a short run: an EMA window of ~200 steps
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.sample.every_steps = 1000
  c.sample.rows = 10
  c.sample.per_row = 10
  c.sample.num_steps = 50
  c.sample.cfg_scale = 3.0  # guidance makes every row clearly its class
  if not arg:  # scored as it trains (dimsum_jax.evaluate.training); the variants keep eval off
    c.eval.every_steps = 250  # and at the end: eval/... scalars in metrics.jsonl
    c.eval.features = 'digits'  # the digits net's FID-like distance: no download
    c.eval.metrics = 'fid,precision,recall,accuracy'
    c.eval.num_samples = 1000
    c.eval.sample_batch_size = 500
    c.eval.num_steps = 10  # Euler, 10 model evaluations per sample
    # No guidance: the grid's scale 3 makes every sample a prototype of its class (accuracy
    # 0.999 at step 2000) and the FID-like distance then grows as training sharpens them.
    c.eval.cfg_scale = 1.0

  if arg in ('smoke', 'smoke_dit'):
    c.data.image_size = 8
    c.data.global_batch_size = 16
    c.model.input_size = 8
    c.model.name = 'DiMSUM-L/2' if arg == 'smoke' else 'DiT-S/2'
    c.model.hidden_size = 64 if arg == 'smoke' else 48  # DiT-S has 6 heads
    c.num_train_steps = 4
    c.optim.warmup_steps = 0
    c.optim.schedule = 'constant'  # the same lr whatever num_train_steps a test sets
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.sample.every_steps = 0
    c.sample.rows = 2
    c.sample.per_row = 2
    c.sample.num_steps = 2
  elif arg == 'dim':
    # DiM (models/dim.py) with its own objective: the discrete scaled-linear schedule and noise
    # prediction (transport path ScaledLinear); EMA grids by the probability-flow ODE (heun, 50
    # evaluations). The digits at their native 8x8 keep DiM's padded sequence at 54 tokens.
    c.data.image_size = 8
    c.model.input_size = 8
    c.model.name = 'DiM-S/2'
    c.model.depth = 3
    c.model.hidden_size = 64
    c.model.scan_impl = 'reference'
    c.transport.path_type = 'ScaledLinear'
    c.transport.prediction = 'noise'
    c.num_train_steps = 2500
    c.checkpoint_every_steps = 500
    c.sample.every_steps = 500
    c.sample.solver = 'heun'
    c.sample.num_steps = 25
  elif arg == 'finetune32':
    # The default run's weights at twice the resolution: 32x32 digits, an 8x8 token grid (the
    # position table interpolated bicubically, dimsum_jax.warm_start; the wavelet windows grow
    # from 1 to 2 tokens), 600 steps.
    c.init_from.path = 'runs/digits'
    c.data.image_size = 32
    c.model.input_size = 32
    c.num_train_steps = 600
    c.optim.warmup_steps = 50
    c.optim.ema_decay = 0.99  # forgets the starting EMA within the run
    c.log_every_steps = 50
    c.checkpoint_every_steps = 300
    c.sample.every_steps = 0  # the grid at the end only
  return c
