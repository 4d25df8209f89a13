"""Tests of the cross-attention teacher and the unimodal student: shapes, masks, dropout, dtypes."""
import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmkd_jax.models import MODELS, Student, Teacher, layers, tokens

B, W, H, C = 3, 8, 2, 5
# Tiny models: XLA's backend optimisations cost more compile time than they save.
FAST = {'xla_backend_optimization_level': 0}
# modality -> (length, feature width)
SPECS = {'a': (4, 3), 'b': (6, 5), 'c': (2, 7)}


def _batch(modalities, seed=0):
  """Random features with padded tail tokens; every example keeps >= 1 real token per modality."""
  rng = np.random.default_rng(seed)
  batch = {}
  for i, m in enumerate(modalities):
    length, features = SPECS[m]
    batch[m] = jnp.asarray(rng.normal(size=(B, length, features)), jnp.float32)
    lengths = np.array([length, max(1, length - 1 - i), 1])
    batch[f'{m}_mask'] = jnp.asarray(np.arange(length)[None] < lengths[:, None])
  return batch


def _teacher(modalities, dtype=jnp.float32, embedding='shared'):
  return Teacher(modalities=tuple(modalities), num_outputs=C, width=W, num_heads=H, num_cross_layers=1,
                 num_self_layers=1, mlp_ratio=2, dropout_rate=0.5, embedding=embedding, dtype=dtype)


def _student(dtype=jnp.float32):
  return Student(modality='a', num_outputs=C, width=W, num_heads=H, num_layers=2, mlp_ratio=2,
                 dropout_rate=0.5, dtype=dtype)


def _numpy_params(model, batch, seed=0):
  """Random parameters of the model's shapes drawn in NumPy (Flax init compiles slowly on CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1 + 0.1 * noise, leaf.dtype)
    return jnp.asarray(noise / np.sqrt(leaf.shape[0]) if len(leaf.shape) > 1 else 0.1 * noise, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _init(model):
  """Parameters and a jitted deterministic apply, cached per model configuration."""
  modalities = getattr(model, 'modalities', ('a',))
  return _numpy_params(model, _batch(modalities)), jax.jit(model.apply, compiler_options=FAST)


def _flat_params(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_models_registered():
  assert MODELS.get('teacher') is Teacher and MODELS.get('student') is Student


@pytest.mark.parametrize('modalities', [('a', 'b'), ('a', 'b', 'c')])
def test_teacher_shapes(modalities):
  """Logits, pooled (N * W), per-layer hidden (B, L_m, W) and attention (B, H, L_m, L_keys)."""
  model = _teacher(modalities)
  params, apply = _init(model)
  logits, taps = apply(params, _batch(modalities))
  chex.assert_shape(logits, (B, C))
  chex.assert_type(logits, jnp.float32)
  assert set(taps) == {'logits', 'pooled', 'hidden', 'attn'}
  np.testing.assert_array_equal(taps['logits'], logits)
  chex.assert_shape(taps['pooled'], (B, len(modalities) * W))
  assert set(taps['hidden']) == set(taps['attn']) == set(modalities)
  for m in modalities:
    length = SPECS[m][0]
    others = sum(SPECS[o][0] for o in modalities if o != m)
    assert isinstance(taps['hidden'][m], tuple) and len(taps['hidden'][m]) == 2
    assert isinstance(taps['attn'][m], tuple) and len(taps['attn'][m]) == 2
    chex.assert_shape(taps['hidden'][m], (B, length, W))
    chex.assert_shape(taps['attn'][m][0], (B, H, length, others))  # cross layer
    chex.assert_shape(taps['attn'][m][1], (B, H, length, length))  # self layer
    chex.assert_tree_all_finite(taps['hidden'][m])


def test_student_shapes():
  """Student taps carry only its modality: hidden (B, L, W), attention (B, H, L, L), pooled W."""
  model = _student()
  params, apply = _init(model)
  logits, taps = apply(params, _batch(('a', 'b')))
  chex.assert_shape(logits, (B, C))
  chex.assert_type(logits, jnp.float32)
  chex.assert_shape(taps['pooled'], (B, W))
  assert set(taps['hidden']) == set(taps['attn']) == {'a'}
  assert len(taps['hidden']['a']) == len(taps['attn']['a']) == 2
  chex.assert_shape(taps['hidden']['a'], (B, SPECS['a'][0], W))
  chex.assert_shape(taps['attn']['a'], (B, H, SPECS['a'][0], SPECS['a'][0]))


def test_student_ignores_other_modalities():
  """Only the student's modality is read: other modalities can be changed or left out."""
  params, apply = _init(_student())
  batch = _batch(('a', 'b'))
  logits, _ = apply(params, batch)
  only_a = {'a': batch['a'], 'a_mask': batch['a_mask']}
  np.testing.assert_allclose(apply(params, only_a)[0], logits, rtol=1e-6, atol=1e-7)


def test_teacher_needs_two_modalities():
  with pytest.raises(ValueError, match='two modalities'):
    _teacher(('a',)).init(jax.random.key(0), _batch(('a',)))


KINDS = ['teacher2', 'teacher3', 'student']


def _setup(kind):
  """(modalities, params, apply, batch) of a two- or three-modality teacher or the student."""
  modalities = {'teacher2': ('a', 'b'), 'teacher3': ('a', 'b', 'c'), 'student': ('a',)}[kind]
  params, apply = _init(_student() if kind == 'student' else _teacher(modalities))
  return modalities, params, apply, _batch(modalities)


def _key_masks(modalities, batch):
  """Stream m -> (key mask over the other modalities for cross layers, m's own mask)."""
  return {m: (np.concatenate([np.asarray(batch[f'{o}_mask']) for o in modalities if o != m], axis=1),
              np.asarray(batch[f'{m}_mask'])) for m in modalities}


@pytest.mark.parametrize('kind', KINDS)
def test_attention_rows_sum_to_one_and_skip_padded_keys(kind):
  """Every attention row is a distribution that puts exactly 0 on padded keys."""
  modalities, params, apply, batch = _setup(kind)
  _, taps = apply(params, batch)
  masks = _key_masks(modalities, batch) if kind != 'student' else {'a': (None, np.asarray(batch['a_mask']))}
  for m, maps in taps['attn'].items():
    cross_mask, self_mask = masks[m]
    for layer, probs in enumerate(maps):
      probs = np.asarray(probs)
      key_mask = self_mask if kind == 'student' or layer == 1 else cross_mask
      np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
      padded = np.broadcast_to(~key_mask[:, None, None, :], probs.shape)
      assert padded.any()
      assert np.all(probs[padded] == 0.0)
      assert np.all(probs[~padded] > 0.0)


def _scramble_padding(batch, modalities, seed=1):
  """The batch with large random features at every padded position of every modality."""
  rng = np.random.default_rng(seed)
  out = dict(batch)
  for m in modalities:
    noise = jnp.asarray(100 * rng.normal(size=batch[m].shape), jnp.float32)
    out[m] = jnp.where(batch[f'{m}_mask'][..., None], batch[m], noise)
  return out


@pytest.mark.parametrize('kind', KINDS)
def test_padding_values_do_not_matter(kind):
  """Features at padded positions change no logits, pooled or real-position hidden states."""
  modalities, params, apply, batch = _setup(kind)
  scrambled = _scramble_padding(batch, modalities)
  assert not np.allclose(scrambled[modalities[-1]], batch[modalities[-1]])
  logits, taps = apply(params, batch)
  logits2, taps2 = apply(params, scrambled)
  np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(taps2['pooled'], taps['pooled'], rtol=1e-5, atol=1e-6)
  for m in taps['hidden']:
    real = np.asarray(batch[f'{m}_mask'])
    for h, h2 in zip(taps['hidden'][m], taps2['hidden'][m]):
      np.testing.assert_allclose(np.asarray(h2)[real], np.asarray(h)[real], rtol=1e-5, atol=1e-6)
      # control: the padded positions themselves do change
      assert not np.allclose(np.asarray(h2)[~real], np.asarray(h)[~real])


@pytest.mark.parametrize('embedding', ['shared', 'per_position'])
def test_a_fully_missing_modality_feeds_nothing_into_the_teacher(embedding):
  """Every token of modality b padded (a missing modality): a's queries attend to no b key (zero
  probabilities, zero context), so b's features and its learned position embeddings change nothing."""
  model = _teacher(('a', 'b'), embedding=embedding)
  params, apply = _init(model)
  batch = dict(_batch(('a', 'b')))
  batch['b_mask'] = jnp.zeros_like(batch['b_mask'])
  logits, taps = apply(params, batch)
  assert np.all(np.asarray(taps['attn']['a'][0]) == 0.0)  # a's cross-attention over b's keys
  changed = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 1.0 if 'embed_b' in jax.tree_util.keystr(path) else x, params)
  position = 'position' if embedding == 'shared' else 'bias'
  assert not np.array_equal(changed['params']['embed_b'][position], params['params']['embed_b'][position])
  scrambled = {**batch, 'b': 100 * batch['b'] + 1}
  np.testing.assert_array_equal(apply(changed, scrambled)[1]['pooled'][:, :W], taps['pooled'][:, :W])


def test_per_position_embedding_matches_float64_per_position_affine_maps():
  """Token l of the per-position embedding is x_l @ kernel_l + bias_l with its own kernel per position:
  a float64 NumPy loop over positions gives the same tokens, and a shared kernel would not."""
  embed = tokens.PerPositionEmbed(W)
  x = np.random.default_rng(0).normal(size=(B, 4, 3))
  params = embed.init(jax.random.key(0), jnp.asarray(x, jnp.float32))['params']
  kernel, bias = (np.asarray(params[k], np.float64) for k in ('kernel', 'bias'))
  assert kernel.shape == (4, 3, W) and bias.shape == (4, W)
  assert not np.allclose(kernel[0], kernel[1])  # positions start with different maps
  want = np.stack([x[:, l] @ kernel[l] + bias[l] for l in range(4)], axis=1)
  np.testing.assert_allclose(embed.apply({'params': params}, jnp.asarray(x, jnp.float32)), want, rtol=1e-5, atol=1e-5)


def test_unknown_embedding_names_the_choices():
  with pytest.raises(ValueError, match="unknown token embedding 'rows'; valid choices: per_position, shared"):
    _teacher(('a', 'b'), embedding='rows').init(jax.random.key(0), _batch(('a', 'b')))


def test_bfloat16_attention_logits_are_float32():
  """The attention's q . k is accumulated in float32 before the softmax: its probabilities equal the
  float32 softmax of the (bfloat16) q and k the module computed, far closer than bfloat16 logits get."""
  attention = layers.MultiHeadAttention(num_heads=H, dtype=jnp.bfloat16)
  rng = np.random.default_rng(0)
  x = jnp.asarray(3 * rng.normal(size=(B, 6, W)), jnp.float32)
  mask = jnp.asarray(np.arange(6)[None] < np.array([6, 4, 2])[:, None])
  params = attention.init(jax.random.key(0), x, None, mask)
  (_, probs), captured = attention.apply(params, x, None, mask, capture_intermediates=True,
                                         mutable=['intermediates'])
  qkv = captured['intermediates']['qkv']['__call__'][0].astype(jnp.float32)
  q, k = qkv[:, :, 0], qkv[:, :, 1]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision='highest') / np.sqrt(W // H)
  want = jax.nn.softmax(jnp.where(mask[:, None, None, :], logits, -jnp.inf), axis=-1)
  np.testing.assert_allclose(probs, want, atol=2e-6)


@pytest.mark.parametrize('kind', ['teacher', 'student'])
def test_dropout_only_in_training(kind):
  """train=True with different dropout rngs differs; train=False is deterministic and needs no rng."""
  modalities = ('a', 'b')
  model = _teacher(modalities) if kind == 'teacher' else _student()
  params, apply = _init(model)
  batch = _batch(modalities)
  # rbg keys: threefry dropout masks take many seconds to compile on CPU.
  train_fn = jax.jit(lambda p, b, key: model.apply(p, b, train=True, rngs={'dropout': key})[0],
                     compiler_options=FAST)
  train = lambda seed: train_fn(params, batch, jax.random.key(seed, impl='rbg'))

  eval_logits = apply(params, batch)[0]  # train defaults to False
  np.testing.assert_array_equal(apply(params, batch)[0], eval_logits)
  a, b, a_again = train(1), train(2), train(1)
  assert not np.allclose(a, b)
  assert not np.allclose(a, eval_logits)
  np.testing.assert_array_equal(a, a_again)


@pytest.mark.parametrize('kind', ['teacher', 'student'])
def test_dropout_mask_follows_the_example_index(kind):
  """An example's dropout mask depends on its batch['example_index'], not on where it sits in the
  array: a slice of the batch given its global indices reproduces those rows of the whole batch."""
  modalities = ('a', 'b')
  model = _teacher(modalities) if kind == 'teacher' else _student()
  params, _ = _init(model)
  batch = _batch(modalities)
  key = jax.random.key(3)
  train = jax.jit(lambda p, b: model.apply(p, b, train=True, rngs={'dropout': key})[0], compiler_options=FAST)
  whole = train(params, batch)
  tail = train(params, {**jax.tree.map(lambda x: x[1:], batch), 'example_index': jnp.arange(1, B)})
  np.testing.assert_allclose(tail, whole[1:], rtol=1e-6, atol=1e-6)
  # control: the same rows keyed as examples 0 and 1 draw other masks
  shifted = train(params, jax.tree.map(lambda x: x[1:], batch))
  assert not np.allclose(shifted, whole[1:])


def test_student_smaller_than_teacher():
  """At equal width and depth the student has fewer parameters than the teacher."""
  teacher = Teacher(modalities=('a', 'b'), num_outputs=C, width=W, num_heads=H, num_cross_layers=2,
                    num_self_layers=0, mlp_ratio=2, dropout_rate=0.5)
  t_params = jax.eval_shape(teacher.init, jax.random.key(0), _batch(('a', 'b')))
  s_params = jax.eval_shape(_student().init, jax.random.key(0), _batch(('a',)))
  assert _flat_params(s_params) < _flat_params(t_params)


@pytest.mark.parametrize('kind', ['teacher', 'student'])
def test_bfloat16_runs_and_returns_float32_logits(kind):
  """dtype=bfloat16 computes in bfloat16 but returns float32 logits close to the float32 model's."""
  modalities = ('a', 'b')
  make = functools.partial(_teacher, modalities) if kind == 'teacher' else _student
  batch = _batch(modalities)
  params, apply = _init(make())
  logits32, _ = apply(params, batch)
  logits16, taps16 = jax.jit(make(dtype=jnp.bfloat16).apply, compiler_options=FAST)(params, batch)
  chex.assert_type(logits16, jnp.float32)
  chex.assert_type(taps16['hidden']['a'][0], jnp.bfloat16)
  chex.assert_tree_all_finite(logits16)
  np.testing.assert_allclose(logits16, logits32, atol=0.1)


@pytest.mark.parametrize('features,axis,shape', [(6, -1, (2, 3, 4)), ((3, 2, 5), -1, (2, 3, 4)),
                                                 (7, (-2, -1), (2, 3, 2, 5))])
def test_dense_matches_flax_dense_general(features, axis, shape):
  """layers.Dense has DenseGeneral's parameters, initial values and outputs (float64 reference)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  ours, flax_dense = layers.Dense(features, axis=axis), nn.DenseGeneral(features, axis=axis)
  params = ours.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(params, flax_dense.init(jax.random.key(1), x))
  params = jax.tree.map(lambda p: p + jnp.asarray(np.random.default_rng(2).normal(size=p.shape), p.dtype), params)
  kernel, bias = (np.asarray(params['params'][k], np.float64) for k in ('kernel', 'bias'))
  n_in = 1 if isinstance(axis, int) else len(axis)
  expected = np.tensordot(np.asarray(x, np.float64), kernel, axes=n_in) + bias
  np.testing.assert_allclose(ours.apply(params, x), expected, rtol=1e-5, atol=1e-5)


def test_softmax_and_its_derivatives_match_float64():
  """The closed-form softmax derivative agrees with the float64 Jacobian, forward and reverse."""
  rng = np.random.default_rng(0)
  x, t = rng.normal(size=(2, 3, 6)) * 3, rng.normal(size=(2, 3, 6))
  x[0, 1, 2] = np.finfo(np.float32).min  # a masked key
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  jvp_expected = p * (t - np.sum(p * t, -1, keepdims=True))  # Jacobian of softmax is diag(p) - p p^T (symmetric)
  y, jvp = jax.jvp(layers.softmax, (jnp.asarray(x, jnp.float32),), (jnp.asarray(t, jnp.float32),))
  _, vjp_fn = jax.vjp(layers.softmax, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(y, p, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jvp, jvp_expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vjp_fn(jnp.asarray(t, jnp.float32))[0], jvp_expected, rtol=1e-5, atol=1e-6)


def test_layer_norm_matches_flax_forward_and_float64_gradients():
  """layers.LayerNorm has Flax LayerNorm's parameters and forward values bit for bit (eager and under
  jit), and its closed-form derivative matches float64 central differences for x, scale and bias,
  in reverse and in forward mode."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 8)) * 3 + 1
  g = rng.normal(size=x.shape)
  ours, flax_norm = layers.LayerNorm(), nn.LayerNorm()
  params = ours.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  chex.assert_trees_all_equal(params, flax_norm.init(jax.random.key(0), jnp.asarray(x, jnp.float32)))
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  x32 = jnp.asarray(x, jnp.float32)
  chex.assert_trees_all_equal(ours.apply(params, x32), flax_norm.apply(params, x32))
  chex.assert_trees_all_equal(jax.jit(ours.apply)(params, x32), jax.jit(flax_norm.apply)(params, x32))

  def loss64(x, scale, bias):  # float64 reference of sum(g * LayerNorm(x))
    mean = x.mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + layers.LAYER_NORM_EPSILON)
    return np.sum(g * (y * scale + bias))

  point = [x, np.asarray(params['params']['scale'], np.float64), np.asarray(params['params']['bias'], np.float64)]
  expected = []
  for i, value in enumerate(point):
    grad = np.zeros_like(value)
    for j in np.ndindex(value.shape):
      up, down = [p.copy() for p in point], [p.copy() for p in point]
      up[i][j] += 1e-6
      down[i][j] -= 1e-6
      grad[j] = (loss64(*up) - loss64(*down)) / 2e-6
    expected.append(grad)
  _, vjp_fn = jax.vjp(ours.apply, params, x32)
  dparams, dx = vjp_fn(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(dx, expected[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dparams['params']['scale'], expected[1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dparams['params']['bias'], expected[2], rtol=1e-4, atol=1e-5)
  # Forward mode: the derivative of sum(g * LayerNorm) along a direction t is <gradient, t>.
  t = [rng.normal(size=value.shape) for value in point]
  t_params = {'params': {'scale': jnp.asarray(t[1], jnp.float32), 'bias': jnp.asarray(t[2], jnp.float32)}}
  _, dy = jax.jvp(ours.apply, (params, x32), (t_params, jnp.asarray(t[0], jnp.float32)))
  np.testing.assert_allclose(np.vdot(g, dy), sum(np.vdot(e, d) for e, d in zip(expected, t)), rtol=1e-4)


def test_dense_rejects_non_trailing_axes():
  with pytest.raises(ValueError, match=r'axis=\(0, 1\)'):
    layers.Dense(4, axis=(0, 1)).init(jax.random.key(0), jnp.ones((2, 3, 5)))


def test_jitted_init_draws_the_eager_parameters_bit_for_bit():
  # Training initialises under jit (one compiled program); that must not move any reported number.
  # The student has every parameter kind of both models (eager init of a teacher takes 15 s).
  model, batch = _student(), _batch(('a',))
  for seed in (0, 3):
    eager = model.init(jax.random.key(seed), batch)['params']
    jitted = jax.jit(model.init)(jax.random.key(seed), batch)['params']
    chex.assert_trees_all_equal(jitted, eager)


def test_use_cpu_kernels_follows_the_choice_and_the_backend():
  assert layers.use_cpu_kernels('cpu') and not layers.use_cpu_kernels('flax')
  assert layers.use_cpu_kernels('auto') == (jax.default_backend() == 'cpu')
  with pytest.raises(ValueError, match="kernels='gpu' is unknown; valid choices: auto, cpu, flax"):
    layers.use_cpu_kernels('gpu')


def _both_paths(kind):
  """The CPU-kernel and the Flax-layer version of one small model, and a batch for it."""
  model = _teacher(('a', 'b')).clone(num_self_layers=0) if kind == 'teacher' else _student()  # student: self-attention
  return model.clone(kernels='cpu'), model.clone(kernels='flax'), _batch(getattr(model, 'modalities', ('a',)))


@pytest.mark.parametrize('kind', ['teacher', 'student'])
def test_both_paths_share_parameters_and_agree(kind):
  """One parameter tree (names, shapes, initial values) for both paths, the same outputs and taps, and
  each path really runs its own layers (custom JVPs of the CPU kernels only on the CPU path)."""
  cpu, flax_layers, batch = _both_paths(kind)
  chex.assert_trees_all_equal(jax.jit(cpu.init)(jax.random.key(3), batch),
                              jax.jit(flax_layers.init)(jax.random.key(3), batch))
  params = _numpy_params(cpu, batch)
  chex.assert_trees_all_close(jax.jit(cpu.apply)(params, batch), jax.jit(flax_layers.apply)(params, batch),
                              rtol=1e-5, atol=1e-5)
  custom = lambda model: set(re.findall(r'custom_jvp_call\[\s*name=(\w+)', str(jax.make_jaxpr(model.apply)(
      params, batch)))) - {'relu'}
  assert custom(cpu) == {'_layer_norm', 'softmax'} and custom(flax_layers) == set()


@pytest.mark.parametrize('kind', ['teacher', 'student'])
def test_forward_mode_derivatives_work_on_both_paths_and_agree(kind):
  """jax.jvp through the model in its parameters and inputs on both paths: the tangents agree between
  the paths and with reverse mode (<J v, u> = <v, J^T u>); jax.jacfwd runs too."""
  cpu, flax_layers, batch = _both_paths(kind)
  params = _numpy_params(cpu, batch)['params']
  modality = 'a'
  rng = np.random.default_rng(4)
  tangent = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), (params, batch[modality]))
  cotangent = jnp.asarray(rng.normal(size=(B, C)), jnp.float32)
  results = {}
  for name, model in (('cpu', cpu), ('flax', flax_layers)):
    logits = lambda p, x, model=model: model.apply({'params': p}, {**batch, modality: x})[0]

    def derivatives(p, x, t, logits=logits):
      jvp = jax.jvp(logits, (p, x), t)[1]
      reverse = jax.vjp(logits, p, x)[1](cotangent)
      dot_reverse = sum(jnp.vdot(r, t) for r, t in zip(jax.tree.leaves(reverse), jax.tree.leaves(t)))
      return jvp, dot_reverse, jax.jacfwd(logits, argnums=1)(p, x)

    jvp, dot_reverse, jacobian = jax.jit(derivatives)(params, batch[modality], tangent)
    np.testing.assert_allclose(jnp.vdot(jvp, cotangent), dot_reverse, rtol=1e-4)
    assert jacobian.shape == (B, C, B, *SPECS[modality])
    results[name] = jvp, jacobian
  assert float(jnp.max(jnp.abs(results['cpu'][0]))) > 1e-3  # a real tangent, not zeros on both paths
  chex.assert_trees_all_close(results['cpu'], results['flax'], rtol=1e-4, atol=1e-5)
