"""Tests of the distillation methods against float64 NumPy references and generic loss properties."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmkd_jax import testing
from mmkd_jax.distill import LevelContext, Term, collect_pairs, distillation_losses
from mmkd_jax.distill.methods import METHODS, mse

NAMES = METHODS.names()
# Methods whose loss is not zero at student == teacher (InfoNCE still has the other candidates).
NONZERO_AT_MATCH = {'contrastive'}
B, L, F, C = 5, 3, 4, 6
FAST = testing.FAST


def _takes_labels(name):
  return METHODS.info(name).takes_labels


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


@functools.lru_cache(maxsize=None)
def _with_hparams(name, hparams):
  """The method compiled with the hyperparameters `hparams` ((name, value) pairs), static as in training."""
  return jax.jit(functools.partial(METHODS.get(name), **dict(hparams)), compiler_options=FAST)


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


def _ref_attention_transfer(s, t, mask, p=2.0):
  """The paper's F(A) = sum_c |A_c|^p per token, L2-normalised; squared distance, example mean."""
  w = np.broadcast_to(mask, s.shape[:-1]).reshape(s.shape[0], -1)

  def q(x):
    e = np.sum(np.abs(x)**p, -1).reshape(x.shape[0], -1) * w
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


def _ref_relational(s, t, mask, distance_weight=1.0, angle_weight=2.0, full_matrix=False):
  """RKD with explicit loops: distances normalised by their mean over off-diagonal real pairs, the
  distance term averaged over those pairs or (full_matrix, the authors' code) over all R x R real
  pairs, i == j included; angles over all real triples."""
  s, real = _flat(s, mask)
  t, _ = _flat(t, mask)
  idx = np.flatnonzero(real)
  pairs = [(i, j) for i in idx for j in idx if i != j]

  def distances(x):
    d = {p: np.linalg.norm(x[p[0]] - x[p[1]]) for p in pairs}
    mu = np.mean(list(d.values()))
    return {p: v / mu for p, v in d.items()}

  d_s, d_t = distances(s), distances(t)
  distance = np.sum([_huber(d_s[p], d_t[p]) for p in pairs]) / (len(idx)**2 if full_matrix else len(pairs))

  def cos_at_j(x, i, j, k):
    a, b = x[i] - x[j], x[k] - x[j]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else a @ b / (na * nb)

  triples = list(itertools.product(idx, repeat=3))
  angle = np.mean([_huber(cos_at_j(s, *p), cos_at_j(t, *p)) for p in triples])
  return distance_weight * distance + angle_weight * angle


def _ref_contrastive(s, t, mask, temperature=0.1, symmetric=False):
  """InfoNCE over real examples: -log softmax_j(s_i . t_j / T)[i]; symmetric: mean with the
  teacher -> student direction -log softmax_j(t_i . s_j / T)[i]."""
  s, real = _flat(s, mask)
  t, _ = _flat(t, mask)
  s = s / np.linalg.norm(s, axis=1, keepdims=True).clip(1e-300)
  t = t / np.linalg.norm(t, axis=1, keepdims=True).clip(1e-300)
  idx = np.flatnonzero(real)

  def info_nce(queries, keys):
    return np.mean([np.log(np.sum([np.exp(queries[i] @ keys[j] / temperature) for j in idx]))
                    - queries[i] @ keys[i] / temperature for i in idx])

  return 0.5 * (info_nce(s, t) + info_nce(t, s)) if symmetric else info_nce(s, t)


def _ref_dkd(s, t, mask, labels, temperature=4.0, alpha=1.0, beta=8.0):
  """Decoupled KD from float64 probabilities: the non-target mass is the sum of the non-target
  probabilities (1 - p_target would round to 0 where p_target is within 1e-16 of 1)."""
  rows = []
  for s_row, t_row, y in zip(s / temperature, t / temperature, np.asarray(labels)):
    p_s, p_t = np.exp(_log_softmax(s_row)), np.exp(_log_softmax(t_row))
    keep = np.arange(s_row.shape[0]) != y
    b_s, b_t = np.array([p_s[y], p_s[keep].sum()]), np.array([p_t[y], p_t[keep].sum()])
    tckd = np.sum(b_t * np.log(b_t / b_s))
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
    'attention_transfer': (_ref_attention_transfer, [{}, {'p': 1.0}, {'p': 4.0}], True),
    'relational': (_ref_relational, [{}, {'distance_weight': 0.7, 'angle_weight': 0.0},
                                     {'distance_weight': 0.0, 'angle_weight': 1.3},
                                     {'full_matrix': True}, {'full_matrix': True, 'angle_weight': 0.0}], True),
    'contrastive': (_ref_contrastive, [{}, {'temperature': 0.5}, {'symmetric': True},
                                       {'symmetric': True, 'temperature': 0.5}], False),
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
  got = _with_hparams(name, tuple(sorted(hparams.items())))(s, t, mask, **kwargs)
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


def _extreme_logits():
  """Logits spread about +-50 (T = 1): example 0's student puts the target far below the rest while
  the teacher is sure of it, so the student's binary target probability (about e^-100) underflows
  float32; example 1 the other way round."""
  student = np.full((3, C), 50.0)
  teacher = np.full((3, C), -50.0)
  student[0, 2], teacher[0, 2] = -50.0, 50.0
  student[1, 4], teacher[1, 4] = 50.0, -50.0
  student[1, 0], teacher[1, 0] = -50.0, 50.0
  student[2] = np.linspace(-50, 50, C)
  teacher[2] = np.linspace(50, -50, C)
  return student, teacher, np.array([2, 4, 1])


def _numeric_gradient(f, x, h=1e-5):
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[index] = h
    grad[index] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


@pytest.mark.parametrize('hparams', [{'temperature': 1.0}, {'temperature': 1.0, 'alpha': 1.0, 'beta': 0.0}])
def test_dkd_at_large_logit_gaps_matches_float64(hparams):
  """At +-50 logits and T = 1, value and student gradient equal a float64 reference (binary
  probabilities clipped at 1e-12 made this TCKD 3.7x too small and that gradient exactly 0)."""
  student, teacher, labels = _extreme_logits()
  mask = np.ones(3)
  method = functools.partial(METHODS.get('dkd'), labels=jnp.asarray(labels), **hparams)
  got = float(method(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), jnp.asarray(mask)))
  reference = lambda s: _ref_dkd(s, teacher, mask, labels, **hparams)
  want = reference(student)
  assert want > 30  # the TCKD of example 0 alone is about 100, over 3 examples
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = np.asarray(jax.grad(lambda s: method(s, jnp.asarray(teacher, jnp.float32), jnp.asarray(mask)))(
      jnp.asarray(student, jnp.float32)))
  want_grad = _numeric_gradient(reference, student)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)
  assert grad[0, 2] < -0.3  # the most wrong example's target logit is pushed up


def test_option_docstrings_state_the_conventions():
  """Each convention option is stated in its method's docstring (the paper / reference it follows)."""
  for name, words in [('relational', ('full_matrix', 'torchdistill', 'R x R')), ('attention_transfer', ('p',)),
                      ('contrastive', ('symmetric', 'teacher -> student')), ('dkd', ('logsumexp',))]:
    doc = METHODS.get(name).__doc__
    assert all(word in doc for word in words), name


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


# ---------------------------------------------------------------- generic properties (mmkd_jax.testing)


@pytest.mark.parametrize('check', list(testing.CHECKS))
@pytest.mark.parametrize('name', NAMES)
def test_registered_method_passes_generic_check(name, check):
  """Every registered method passes every check a user's method gets from mmkd_jax.testing."""
  testing.check_method(name, checks=(check,))


@pytest.mark.parametrize('name,hparams', [('relational', {'full_matrix': True}), ('contrastive', {'symmetric': True}),
                                          ('attention_transfer', {'p': 1.0}), ('attention_transfer', {'p': 4.0})])
def test_options_pass_generic_checks(name, hparams):
  testing.check_method(name, hparams)


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


def _leaks_padding(student, teacher, mask=None):
  """MSE over every row, padded ones included."""
  del mask
  return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)))


def _float64_out(student, teacher, mask=None):
  return mse(student, teacher, mask).astype(jnp.bfloat16)


def _prefers_other_teachers(student, teacher, mask=None):
  return -mse(student, teacher, mask)


def _nan_gradient_at_padding(student, teacher, mask=None):
  w = jnp.broadcast_to(mask, student.shape[:-1])[..., None]
  rows = jnp.sqrt(jnp.sum(jnp.square(student - teacher) * w, axis=-1))  # sqrt'(0) = inf on padded rows
  return jnp.sum(rows) / jnp.maximum(jnp.sum(w), 1.0)


def _depends_on_trailing_padding(student, teacher, mask=None):
  return jnp.mean(jnp.square(student - teacher))


@pytest.mark.parametrize('function,registration,failing', [
    (_leaks_padding, {}, 'gradient_zero_on_padding'),
    (_float64_out, {}, 'jit_float32_scalar'),
    (_prefers_other_teachers, {}, 'student_equals_teacher'),
    (_nan_gradient_at_padding, {'levels': ('hidden',)}, 'gradient_zero_on_padding'),
    (_depends_on_trailing_padding, {'levels': ('attention',)}, 'attention_padding_independent'),
])
def test_generic_checks_catch_broken_methods(function, registration, failing):
  """Each check can fail: a method broken in its way is refused, naming the check."""
  with pytest.raises(AssertionError, match=f"method '{function.__name__}' fails check '{failing}'"):
    testing.check_method(function, checks=(failing,), **registration)


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
  token_mask[3, 0] = 1  # every example keeps a real token (fully padded ones: testing.gradient_zero_on_padding)
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
