"""Shared defaults: mfeat, a Fourier+pixel teacher, a Fourier student. Variants import this."""
import os

import ml_collections

from mmkd_jax import data, distill


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Job: 'teacher' (train the teacher), 'student' (baseline student) or 'distill' (the full comparison).
  config.job = 'distill'
  # Seed of the teacher and of single runs; student seeds of the comparison are in config.report.seeds.
  config.seed = 0
  # Replace runs of another config found in the workdir (otherwise such a workdir is refused).
  config.overwrite = False
  # Your own modules (comma-separated importable names or paths to .py files) that register distillation
  # methods, levels or datasets; imported before the config is checked (see docs/new_method.md).
  config.plugins = ''

  # Dataset: name ('mfeat', 'synthetic', ...), data_dir, manual_dir and per-dataset options.
  config.data = data.default_data_config('mfeat')

  config.teacher = ml_collections.ConfigDict()
  # Comma-separated modalities the teacher fuses (two or more), each cross-attending to the others.
  config.teacher.modalities = 'fou,pix'
  # Model width, attention heads and MLP expansion.
  config.teacher.width = 64
  config.teacher.num_heads = 4
  config.teacher.mlp_ratio = 4
  # Cross-attention blocks per modality stream, then self-attention blocks after fusion.
  config.teacher.num_cross_layers = 2
  config.teacher.num_self_layers = 0
  config.teacher.dropout_rate = 0.1
  # How feature chunks become tokens (mmkd_jax/models/tokens.py): 'per_position' gives each token
  # position its own projection (tabular views; +5.7 points for this teacher, +3.6 for the student
  # on mfeat: docs/mfeat_defaults.md); 'shared' one projection plus a position embedding (sequences
  # of like frames or words).
  config.teacher.embedding = 'per_position'

  config.student = ml_collections.ConfigDict()
  # The one modality the student sees (the weak Fourier view by default).
  config.student.modality = 'fou'
  # The teacher's width (46% of its parameters: one stream, no cross-attention): its baseline scores
  # above the width-32 one (docs/study.md's table, next to the logistic regression on fou).
  config.student.width = 64
  config.student.num_heads = 4
  config.student.mlp_ratio = 4
  config.student.num_layers = 2
  config.student.dropout_rate = 0.1
  # As config.teacher.embedding.
  config.student.embedding = 'per_position'

  config.distill = ml_collections.ConfigDict()
  # Distillation terms 'level:method:weight,...'; levels: logits, pooled, hidden, attention;
  # methods: kl, mse, l1, cosine, attention_transfer, relational, contrastive, dkd.
  # Default: FitNets-style MSE between the student's hidden states and the teacher's Fourier stream
  # (which has cross-attended to the pixels): one of the four terms of 25 swept over 5 seeds whose
  # paired gain excludes 0, all within noise of each other (docs/mfeat_defaults.md).
  # A term may set its method's hyperparameters for itself: 'attention:kl:0.1:temperature=1.0'.
  config.distill.terms = 'hidden:mse:1.0'
  # Weight of the task loss next to the distillation terms.
  config.distill.task_weight = 1.0
  # Teacher->student layer map for hidden/attention levels, 'student:teacher,...' (0-based); '' = spread evenly.
  config.distill.layer_map = ''
  # Learn a linear map from the student's width to the teacher's where they differ (hidden, pooled).
  config.distill.projection = True
  # Directory of the teacher run; '' = <workdir>/teacher (trained there first if missing).
  config.distill.teacher_dir = ''
  # Compute the frozen teacher's side of every distilled pair once for the training set and read it
  # with each batch, instead of running the teacher in every step (a speed knob; the numbers move
  # by float rounding only). Above cache_teacher_max_gb GiB of such targets the teacher runs online.
  config.distill.cache_teacher = True
  config.distill.cache_teacher_max_gb = 2.0
  # Hyperparameters of each method (config.distill.hparams.<method>.<name>), for every registered method
  # (plug-ins included) at the defaults of its signature in mmkd_jax/distill/methods.py: kl.temperature,
  # dkd.{temperature, alpha, beta}, contrastive.{temperature, symmetric}, attention_transfer.p,
  # relational.{distance_weight, angle_weight, full_matrix}.
  config.distill.hparams = ml_collections.ConfigDict(distill.default_hparams())

  config.train = ml_collections.ConfigDict()
  # Global batch size (split over all devices) and the batch size of evaluation passes.
  config.train.batch_size = 64
  config.train.eval_batch_size = 100
  # Budget: optimizer steps per run, the same for every arm.
  config.train.num_steps = 600
  # Optimizer ('adamw', 'adam', 'sgd'), peak learning rate, weight decay, global-norm clipping (0 = off).
  config.train.optimizer = 'adamw'
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 1e-4
  config.train.grad_clip = 1.0
  # Learning-rate schedule ('cosine', 'constant', 'linear') after a linear warm-up.
  config.train.schedule = 'cosine'
  config.train.warmup_steps = 50
  # Compute dtype of the models ('float32' or 'bfloat16'; parameters and losses stay float32).
  config.train.compute_dtype = 'float32'
  # Layer implementations: 'cpu' (mmkd_jax.models.layers' CPU kernels, one flat gradient all-reduce),
  # 'flax' (Flax's layers, XLA's collectives) or 'auto' (cpu on the CPU backend, flax on GPU/TPU).
  # Both have the same parameters, so a checkpoint of one resumes or evaluates with the other.
  config.train.kernels = 'auto'
  # Progress line / TensorBoard every log_every steps; validation + checkpoint every eval_every steps.
  config.train.log_every = 100
  config.train.eval_every = 100
  # A non-finite loss or gradient stops training (False) or skips that update and counts it (True).
  config.train.skip_nonfinite = False
  # Train the seeds of an arm (the baselines, the distilled students, a study cell's) as one
  # population in one compiled program (False: one run after another, as separate programs).
  config.train.population = True
  # Train steps per compiled call (a scan over batches fetched ahead); a call also ends at each
  # log / eval boundary. 1 dispatches (and reads the non-finite flag back) every step; time other values
  # with `python benchmarks/throughput.py --config.train.steps_per_call=K`.
  config.train.steps_per_call = 10
  # Keep the training split on the devices and gather batches there when it needs at most this many
  # MiB (with the teacher's cached targets); above it, batches are gathered on the host.
  config.train.device_data_max_mb = 1024

  config.report = ml_collections.ConfigDict()
  # Student seeds of the comparison (comma-separated): mean +- std over them in the report and a
  # 95% interval of the paired gains (at least 3 seeds; 5 make the interval usefully narrow).
  config.report.seeds = '0,1,2,3,4'
  # Confidence interval of every gain (paired by seed, see mmkd_jax/stats.py): 'auto' (95% Student-t
  # from 3 seeds on, reported as undefined below), 'student_t' (fewer than 3 seeds is a config error)
  # or 'none'.
  config.report.interval = 'auto'
  # Latency: median of this many jitted forward calls on a batch of this size.
  config.report.latency_batch_size = 100
  config.report.latency_repeats = 50

  config.distributed = ml_collections.ConfigDict()
  # Multi-host: coordinator 'host:port' ('' = let jax.distributed auto-detect a TPU pod / SLURM job,
  # or run as one process), number of processes (0 = auto) and this process's id (-1 = auto).
  config.distributed.coordinator_address = ''
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  # Start jax.distributed: 'auto' (with a coordinator address or under SLURM / a TPU pod's environment
  # variables), 'always' (JAX detects the cluster: needed on TPU VM slices made with gcloud), 'never'.
  config.distributed.initialize = 'auto'

  config.host = ml_collections.ConfigDict()
  # Split the host CPU into this many JAX devices (0 = JAX's default of one): the data-parallel
  # step then spreads each model over the cores. The global batch must divide evenly.
  config.host.cpu_devices = 0
  # Where CPU computations run: 'sync' (on the calling thread), 'async' (on worker threads) or 'auto'
  # (sync with one CPU device, async with several, so that the devices' computations overlap).
  config.host.cpu_dispatch = 'auto'
  # Let glibc malloc keep freed memory, so that each step's large scratch buffer is not mapped and
  # page-faulted in again every step (see mmkd_jax/runtime.py).
  config.host.keep_freed_memory = True
  # Keep compiled XLA programs here ('' = off), so that a program compiled before (another seed's run
  # of the same model, a re-run of the job, the study's repeated cells) loads instead of compiling
  # again; least recently used entries go beyond 2 GiB. Default: $MMKD_JAX_COMPILATION_CACHE if set.
  config.host.compilation_cache_dir = os.environ.get('MMKD_JAX_COMPILATION_CACHE', '~/.cache/mmkd_jax/xla')

  config.mesh = ml_collections.ConfigDict()
  # Devices on the 'model' mesh axis (reserved; 1 = pure data parallelism over all devices).
  config.mesh.model = 1
  return config
