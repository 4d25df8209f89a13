"""Tests of the distillation methods against float64 NumPy references and generic loss properties."""
import functools
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmkd_jax.distill import LevelContext, Term, collect_pairs, distillation_losses
from mmkd_jax.distill.methods import INPUTS, METHODS

NAMES = METHODS.names()
# Methods whose loss is not zero at student == teacher (InfoNCE still has the other candidates).
NONZERO_AT_MATCH = {'contrastive'}
B, L, F, C = 5, 3, 4, 6
# Tiny inputs: XLA's backend optimisations cost more compile time than they save.
FAST = {'xla_backend_optimization_level': 0}


def _takes_labels(name):
  return 'labels' in inspect.signature(METHODS.get(name)).parameters


def _token_mask():
  """(B, L) mask with padded tokens, one fully padded example and full examples."""
  mask = np.ones((B, L))
  mask[0, 2] = 0
  mask[2, 1:] = 0
  mask[3] = 0
  return mask


def _example_mask():
  mask = np.ones(B + 1)
  mask[[1, 4]] = 0
  return mask


def _inputs(name, seed=0):
  """(student, teacher, mask, kwargs) in float32 with padding; logits (B, C) for label methods."""
  rng = np.random.default_rng(seed)
  if _takes_labels(name):
    mask = _example_mask()
    shape = (mask.shape[0], C)
    kwargs = {'labels': jnp.asarray(rng.integers(0, C, mask.shape[0]))}
  else:
    mask, shape, kwargs = _token_mask(), (B, L, F), {}
  s = rng.normal(size=shape).astype(np.float32)
  t = rng.normal(size=shape).astype(np.float32)
  return jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask, jnp.float32), kwargs


@functools.lru_cache(maxsize=None)
def _jitted(name):
  """The method with default hyperparameters, compiled (eager dispatch op by op is slow)."""
  return jax.jit(METHODS.get(name), compiler_options=FAST)


def _defaults(name):
  """The method's hyperparameters with their default values."""
  params = inspect.signature(METHODS.get(name)).parameters.values()
  return {p.name: p.default for p in params if p.name not in INPUTS}


@functools.lru_cache(maxsize=None)
def _traced_hparams(name):
  """The method compiled once with its hyperparameters as traced values, for every setting."""
  return jax.jit(lambda s, t, mask, kwargs, hparams: METHODS.get(name)(s, t, mask, **kwargs, **hparams),
                 compiler_options=FAST)


@functools.lru_cache(maxsize=None)
def _student_grad(name):
  """jit(d loss / d student) with default hyperparameters."""
  return jax.jit(jax.grad(lambda s, t, mask, kwargs: METHODS.get(name)(s, t, mask, **kwargs)),
                 compiler_options=FAST)


def _padding(mask):
  """Boolean array over the input's rows: True where the mask is 0."""
  return np.asarray(mask) == 0


# ---------------------------------------------------------------- float64 NumPy references


def _rows_mean(rows, mask):
  w = np.broadcast_to(np.asarray(mask, np.float64), rows.shape)
  return np.sum(rows * w) / np.sum(w)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ref_kl(s, t, mask, temperature=4.0):
  log_s, log_t = _log_softmax(s / temperature), _log_softmax(t / temperature)
  rows = np.sum(np.exp(log_t) * (log_t - log_s), -1)
  return temperature**2 * _rows_mean(rows, mask)


def _ref_mse(s, t, mask):
  return _rows_mean(np.mean((s - t)**2, -1), mask)


def _ref_l1(s, t, mask):
  return _rows_mean(np.mean(np.abs(s - t), -1), mask)


def _ref_cosine(s, t, mask):
  cos = np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
  return _rows_mean(1 - cos, mask)


def _ref_attention_transfer(s, t, mask):
  w = np.broadcast_to(mask, s.shape[:-1]).reshape(s.shape[0], -1)

  def q(x):
    e = np.sum(x**2, -1).reshape(x.shape[0], -1) * w
    n = np.linalg.norm(e, axis=1, keepdims=True)
    return np.where(n > 0, e / np.where(n > 0, n, 1), 0)

  per_example = np.sum((q(s) - q(t))**2, 1)
  real = w.max(1)
  return np.sum(per_example * real) / np.sum(real)


def _flat(x, mask):
  w = np.broadcast_to(mask, x.shape[:-1])
  return (x * w[..., None]).reshape(x.shape[0], -1), w.reshape(x.shape[0], -1).max(1) > 0


def _huber(a, b):
  d = abs(a - b)
  return 0.5 * d * d if d <= 1 else d - 0.5


def _ref_relational(s, t, mask, distance_weight=1.0, angle_weight=2.0):
  """RKD with explicit loops: distances over off-diagonal real pairs, angles over all real triples."""
  s, real = _flat(s, mask)
  t, _ = _flat(t, mask)
  idx = np.flatnonzero(real)
  pairs = [(i, j) for i in idx for j in idx if i != j]

  def distances(x):
    d = {p: np.linalg.norm(x[p[0]] - x[p[1]]) for p in pairs}
    mu = np.mean(list(d.values()))
    return {p: v / mu for p, v in d.items()}

  d_s, d_t = distances(s), distances(t)
  distance = np.mean([_huber(d_s[p], d_t[p]) for p in pairs])

  def cos_at_j(x, i, j, k):
    a, b = x[i] - x[j], x[k] - x[j]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else a @ b / (na * nb)

  triples = list(itertools.product(idx, repeat=3))
  angle = np.mean([_huber(cos_at_j(s, *p), cos_at_j(t, *p)) for p in triples])
  return distance_weight * distance + angle_weight * angle


def _ref_contrastive(s, t, mask, temperature=0.1):
  s, real = _flat(s, mask)
  t, _ = _flat(t, mask)
  s = s / np.linalg.norm(s, axis=1, keepdims=True).clip(1e-300)
  t = t / np.linalg.norm(t, axis=1, keepdims=True).clip(1e-300)
  idx = np.flatnonzero(real)
  losses = []
  for i in idx:
    sims = np.array([s[i] @ t[j] for j in idx]) / temperature
    losses.append(np.log(np.sum(np.exp(sims))) - s[i] @ t[i] / temperature)
  return np.mean(losses)


def _ref_dkd(s, t, mask, labels, temperature=4.0, alpha=1.0, beta=8.0):
  rows = []
  for s_row, t_row, y in zip(s / temperature, t / temperature, np.asarray(labels)):
    p_s, p_t = np.exp(_log_softmax(s_row)), np.exp(_log_softmax(t_row))
    b_s, b_t = np.array([p_s[y], 1 - p_s[y]]), np.array([p_t[y], 1 - p_t[y]])
    tckd = np.sum(b_t * np.log(b_t / b_s))
    keep = np.arange(s_row.shape[0]) != y
    q_s, q_t = np.exp(_log_softmax(s_row[keep])), np.exp(_log_softmax(t_row[keep]))
    nckd = np.sum(q_t * np.log(q_t / q_s))
    rows.append(alpha * tckd + beta * nckd)
  return temperature**2 * _rows_mean(np.array(rows), mask)


# name -> (reference, hyperparameter settings to check, whether widths may differ)
REFERENCES = {
    'kl': (_ref_kl, [{}, {'temperature': 1.0}, {'temperature': 2.5}], False),
    'mse': (_ref_mse, [{}], False),
    'l1': (_ref_l1, [{}], False),
    'cosine': (_ref_cosine, [{}], False),
    'attention_transfer': (_ref_attention_transfer, [{}], True),
    'relational': (_ref_relational, [{}, {'distance_weight': 0.7, 'angle_weight': 0.0},
                                     {'distance_weight': 0.0, 'angle_weight': 1.3}], True),
    'contrastive': (_ref_contrastive, [{}, {'temperature': 0.5}], False),
    'dkd': (_ref_dkd, [{}, {'temperature': 2.0, 'alpha': 0.6, 'beta': 3.0},
                       {'temperature': 1.0, 'alpha': 0.0, 'beta': 1.0}], False),
}
REFERENCE_CASES = [(name, i) for name, (_, settings, _) in REFERENCES.items() for i in range(len(settings))]


def test_references_cover_registered_methods():
  """Every reference above tests a method that is still registered."""
  assert set(REFERENCES) <= set(NAMES)


@pytest.mark.parametrize('name,setting', REFERENCE_CASES)
@pytest.mark.parametrize('seed', [0, 1])
def test_matches_numpy_reference(name, setting, seed):
  """Float32 JAX loss equals the float64 NumPy reference on random masked inputs."""
  reference, settings, _ = REFERENCES[name]
  hparams = settings[setting]
  s, t, mask, kwargs = _inputs(name, seed)
  got = _traced_hparams(name)(s, t, mask, kwargs, {**_defaults(name), **hparams})
  args = [np.asarray(a, np.float64) for a in (s, t, mask)]
  want = reference(*args, **kwargs, **hparams)
  assert abs(want) > 1e-3
  np.testing.assert_allclose(float(got), want, rtol=1e-4)


@pytest.mark.parametrize('name', [n for n, (_, _, mixed) in REFERENCES.items() if mixed])
def test_matches_reference_with_different_widths(name):
  """Width-free methods accept a teacher of another feature width."""
  reference = REFERENCES[name][0]
  rng = np.random.default_rng(3)
  s = rng.normal(size=(B, L, F)).astype(np.float32)
  t = rng.normal(size=(B, L, 2 * F + 1)).astype(np.float32)
  mask = _token_mask()
  got = _jitted(name)(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
  want = reference(s.astype(np.float64), t.astype(np.float64), mask)
  np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_kl_by_hand():
  """Two classes at T = 1: KL([.5, .5] || softmax([log 3, 0]) = [.75, .25])."""
  student = jnp.array([[np.log(3.0), 0.0]])
  teacher = jnp.zeros((1, 2))
  want = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
  np.testing.assert_allclose(float(METHODS.get('kl')(student, teacher, None, temperature=1.0)), want, rtol=1e-6)


def test_attention_transfer_ignores_overall_scale():
  """Energy maps are normalised, so scaling the student's activations changes nothing."""
  s, t, mask, _ = _inputs('attention_transfer')
  at = _jitted('attention_transfer')
  np.testing.assert_allclose(float(at(3.0 * s, t, mask)), float(at(s, t, mask)), rtol=1e-5)


def test_relational_invariant_to_scale_and_translation():
  """RKD compares normalised distances and angles: a scaled, shifted student equals the teacher."""
  _, t, _, _ = _inputs('relational')
  mask = jnp.ones((B, L)).at[3].set(0)  # whole examples only: a shift is then the same for all
  student = 2.5 * t + 0.7
  relational = _jitted('relational')
  assert float(relational(student, t, mask)) < 1e-5
  assert float(relational(student, t[::-1], mask)) > 1e-2


# ---------------------------------------------------------------- generic properties


@pytest.mark.parametrize('name', NAMES)
def test_zero_or_minimal_at_match(name):
  """Zero when student == teacher; for contrastive, lower than with shuffled teacher rows."""
  s, _, mask, kwargs = _inputs(name)
  method = _jitted(name)
  at_match = float(method(s, s, mask, **kwargs))
  if name in NONZERO_AT_MATCH:
    shuffled = float(method(s, jnp.roll(s, 1, axis=0), mask, **kwargs))
    assert at_match < shuffled
  else:
    assert abs(at_match) < 1e-5


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_finite_float32_scalar(name, dtype):
  """The loss is a finite float32 scalar, whatever the input dtype."""
  s, t, mask, kwargs = _inputs(name)
  loss = _jitted(name)(s.astype(dtype), t.astype(dtype), mask, **kwargs)
  assert loss.shape == ()
  assert loss.dtype == jnp.float32
  assert np.isfinite(float(loss))


@pytest.mark.parametrize('name', NAMES)
def test_mask_none_is_all_ones(name):
  """mask=None weighs every row, as an all-ones mask does."""
  s, t, mask, kwargs = _inputs(name)
  method = _jitted(name)
  ones = jnp.ones_like(mask)
  np.testing.assert_allclose(float(method(s, t, None, **kwargs)), float(method(s, t, ones, **kwargs)),
                             rtol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_gradient_finite_and_nonzero(name):
  """Without padding, d loss / d student is finite and non-zero when student != teacher."""
  s, t, mask, kwargs = _inputs(name)
  ones = jnp.ones_like(mask)
  grad = np.asarray(_student_grad(name)(s, t, ones, kwargs))
  assert np.all(np.isfinite(grad))
  assert np.any(np.abs(grad) > 1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_gradient_zero_on_padding(name):
  """With padding (incl. a fully padded example), the gradient is finite, exactly zero on padded rows."""
  s, t, mask, kwargs = _inputs(name)
  grad = np.asarray(_student_grad(name)(s, t, mask, kwargs))
  padding = _padding(mask)
  assert np.all(np.isfinite(grad[~padding]))
  assert np.any(np.abs(grad[~padding]) > 1e-6)
  np.testing.assert_array_equal(grad[padding], 0)


@pytest.mark.parametrize('name', NAMES)
def test_padded_rows_do_not_change_loss(name):
  """Rewriting student and teacher values on padded rows leaves the loss unchanged."""
  s, t, mask, kwargs = _inputs(name)
  rng = np.random.default_rng(7)
  padding = _padding(mask)[..., None]
  noisy_s = jnp.where(padding, 50 * rng.normal(size=s.shape), s).astype(jnp.float32)
  noisy_t = jnp.where(padding, 50 * rng.normal(size=t.shape), t).astype(jnp.float32)
  method = _jitted(name)
  np.testing.assert_allclose(float(method(noisy_s, noisy_t, mask, **kwargs)),
                             float(method(s, t, mask, **kwargs)), rtol=1e-6)


def _taps(rng):
  """Fake student/teacher taps with two hidden layers of the 'a' modality and logits."""
  def taps():
    return {'logits': jnp.asarray(rng.normal(size=(B + 1, C)), jnp.float32),
            'hidden': {'a': tuple(jnp.asarray(rng.normal(size=(B, L, F)), jnp.float32) for _ in range(2))}}
  return taps(), taps()


@pytest.mark.parametrize('name', NAMES)
def test_no_teacher_gradient_through_collect_pairs(name):
  """collect_pairs stops the teacher's gradient; the student's still flows."""
  rng = np.random.default_rng(0)
  student_taps, teacher_taps = _taps(rng)
  labels = jnp.asarray(rng.integers(0, C, B + 1))
  if _takes_labels(name):
    level, example_weight = 'logits', jnp.asarray(_example_mask(), jnp.float32)
  else:
    level, example_weight = 'hidden', jnp.ones(B)
  terms = (Term(level, name, 1.0),)
  token_mask = _token_mask()
  token_mask[3, 0] = 1  # every example keeps a real token (fully padded ones: see test_gradient_zero_on_padding)
  context = LevelContext('a', jnp.asarray(token_mask, jnp.float32), example_weight, ((0, 1), (1, 0)))

  def through_pairs(student, teacher):
    pairs = collect_pairs(terms, student, teacher, context)
    return distillation_losses(terms, pairs, {}, labels)[terms[0].name]

  def direct(student, teacher):
    method = METHODS.get(name)
    kwargs = {'labels': labels} if _takes_labels(name) else {}
    if level == 'logits':
      return method(student['logits'], teacher['logits'], example_weight, **kwargs)
    return method(student['hidden']['a'][0], teacher['hidden']['a'][0], context.token_mask, **kwargs)

  @functools.partial(jax.jit, compiler_options=FAST)
  def grads(student, teacher):
    return (jax.grad(through_pairs, argnums=(0, 1))(student, teacher),
            jax.grad(direct, argnums=(0, 1))(student, teacher)[1])

  (g_student, g_teacher), g_direct = grads(student_taps, teacher_taps)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_teacher))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g_student)), 'non-finite student gradient'
  assert any(np.any(np.abs(np.asarray(g)) > 1e-6) for g in jax.tree.leaves(g_student))
  # Control: without collect_pairs the teacher does get a gradient, so the check above can fail.
  assert any(np.any(np.abs(np.asarray(g)) > 1e-6) for g in jax.tree.leaves(g_direct))


def test_readme_example_method_runs_and_matches_float64_huber():
  """The README's "Adding a distillation method" example, executed as written: it registers, its
  config line names only its keywords, and it computes the masked Huber mean."""
  import pathlib
  import re

  from mmkd_jax.distill import methods
  from mmkd_jax.registry import Registry

  readme = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
  section = readme[readme.index('### Adding a distillation method'):]
  function_code, config_line = re.findall(r'```python\n(.*?)```', section, re.S)[:2]
  namespace = {**vars(methods), 'METHODS': Registry('distillation method')}
  exec(function_code, namespace)
  (name,) = namespace['METHODS'].names()
  config_entry = eval('{' + config_line.strip().rstrip(',') + '}')
  assert set(config_entry) == {name}
  assert set(config_entry[name]) <= set(inspect.signature(namespace['METHODS'].get(name)).parameters)
  assert f'hidden:{name}:1.0' in section and f'hparams.{name}.' in section

  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(B, L, F)), 2 * rng.normal(size=(B, L, F))
  mask = _token_mask()
  got = jax.jit(functools.partial(namespace['METHODS'].get(name), delta=0.5))(
      jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(mask, jnp.float32))
  error = np.abs(s - t)
  huber = np.where(error <= 0.5, 0.5 * error**2, 0.5 * (error - 0.25))
  want = np.sum(huber.mean(-1) * mask) / mask.sum()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  real = np.arange(F) < F - 1  # the last feature is padding (as at the attention level)
  got = namespace['METHODS'].get(name)(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                       jnp.asarray(mask, jnp.float32), feature_mask=jnp.asarray(real), delta=0.5)
  want = np.sum(huber[..., real].mean(-1) * mask) / mask.sum()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
