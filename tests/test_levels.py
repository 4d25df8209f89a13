"""Tests of the distillation levels, the layer map, term parsing, projection and the loss table."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmkd_jax.distill import (LEVELS, METHODS, LevelContext, Pair, Projector, Term, cacheable, collect_pairs,
                              default_hparams, distillation_losses, parse_terms, projection_widths,
                              resolve_layer_map, term_hparams, validate_hparams)
from mmkd_jax.errors import ConfigError
from mmkd_jax.distill.levels import query_affinity

B, L, L_OTHER, C = 3, 4, 5, 6
W_S, W_T = 8, 10


def _const(shape, value):
  return jnp.full(shape, float(value), jnp.float32)


def _context(layer_map=((0, 1), (1, 3))):
  token_mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
  return LevelContext('a', token_mask, jnp.asarray([1.0, 1.0, 0.0]), layer_map)


def _fake_taps():
  """Student (2 layers) and teacher (4 layers) taps; every tensor a distinct constant."""
  student = {'logits': _const((B, C), 1), 'pooled': _const((B, W_S), 2),
             'hidden': {'a': tuple(_const((B, L, W_S), 10 + i) for i in range(2)),
                        'b': tuple(_const((B, L_OTHER, W_S), 50 + i) for i in range(2))},
             'attn': {'a': tuple(_const((B, 2, L, L), 0.25) for _ in range(2))}}
  teacher = {'logits': _const((B, C), 3), 'pooled': _const((B, 2 * W_T), 4),
             'hidden': {'a': tuple(_const((B, L, W_T), 20 + i) for i in range(4)),
                        'b': tuple(_const((B, L_OTHER, W_T), 60 + i) for i in range(4))},
             'attn': {'a': tuple(_const((B, 2, L, L_OTHER), 0.2) for _ in range(4))}}
  return student, teacher


def test_registered_levels():
  assert set(LEVELS.names()) >= {'logits', 'pooled', 'hidden', 'attention'}


def test_logits_level():
  """Logits pair the two models' logits with the example weights; not projectable."""
  student, teacher = _fake_taps()
  context = _context()
  pairs = LEVELS.get('logits')(student, teacher, context)
  assert list(pairs) == ['logits']
  p = pairs['logits']
  np.testing.assert_array_equal(p.student, 1.0)
  np.testing.assert_array_equal(p.teacher, 3.0)
  np.testing.assert_array_equal(p.mask, [1.0, 1.0, 0.0])
  assert not p.projectable


def test_pooled_level():
  """Pooled pairs the pooled representations (teacher wider); projectable."""
  student, teacher = _fake_taps()
  p = LEVELS.get('pooled')(student, teacher, _context())['pooled']
  assert p.student.shape == (B, W_S) and p.teacher.shape == (B, 2 * W_T)
  np.testing.assert_array_equal(p.student, 2.0)
  np.testing.assert_array_equal(p.teacher, 4.0)
  np.testing.assert_array_equal(p.mask, [1.0, 1.0, 0.0])
  assert p.projectable


@pytest.mark.parametrize('layer_map', [((0, 1), (1, 3)), ((0, 0), (1, 2)), ((1, 0),)])
def test_hidden_level_follows_layer_map(layer_map):
  """Each mapped (s, t) pair holds student layer s and teacher layer t of the student's modality."""
  student, teacher = _fake_taps()
  context = _context(layer_map)
  pairs = LEVELS.get('hidden')(student, teacher, context)
  assert sorted(pairs) == sorted(f'hidden_{s}_{t}' for s, t in layer_map)
  want_mask = np.asarray(context.token_mask) * np.asarray(context.example_weight)[:, None]
  for s, t in layer_map:
    p = pairs[f'hidden_{s}_{t}']
    assert p.student.shape == (B, L, W_S) and p.teacher.shape == (B, L, W_T)
    np.testing.assert_array_equal(p.student, 10 + s)
    np.testing.assert_array_equal(p.teacher, 20 + t)
    np.testing.assert_array_equal(np.broadcast_to(p.mask, (B, L)), want_mask)
    assert p.projectable


def test_hidden_level_uses_context_modality():
  """With modality 'b' the pairs come from the 'b' streams."""
  student, teacher = _fake_taps()
  token_mask = jnp.ones((B, L_OTHER))
  context = LevelContext('b', token_mask, jnp.ones(B), ((1, 2),))
  p = LEVELS.get('hidden')(student, teacher, context)['hidden_1_2']
  np.testing.assert_array_equal(p.student, 51.0)
  np.testing.assert_array_equal(p.teacher, 62.0)


def _np_affinity(probs, query_mask):
  """float64: log(row-normalised A A^T + 1e-8) with padded query rows of A zeroed, per (b, h)."""
  probs = np.asarray(probs, np.float64)
  out = np.empty(probs.shape[:2] + (probs.shape[2], probs.shape[2]))
  for b in range(probs.shape[0]):
    for h in range(probs.shape[1]):
      a = probs[b, h] * np.asarray(query_mask[b], np.float64)[:, None]
      m = a @ a.T
      sums = m.sum(1, keepdims=True)
      m = np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)
      out[b, h] = np.log(m + 1e-8)
  return out


def _random_probs(rng, shape, key_mask=None):
  logits = rng.normal(size=shape) * 2
  if key_mask is not None:
    logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def test_query_affinity_matches_numpy():
  """query_affinity equals the float64 NumPy computation; padded queries get log(1e-8)."""
  rng = np.random.default_rng(0)
  context = _context()
  probs = _random_probs(rng, (B, 3, L, L_OTHER))
  got = np.asarray(query_affinity(jnp.asarray(probs), context.token_mask))
  want = _np_affinity(probs, np.asarray(context.token_mask))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # example 1 has queries 2 and 3 padded: their rows and columns are empty.
  np.testing.assert_allclose(got[1, :, 2:, :], np.log(1e-8), rtol=1e-6)
  np.testing.assert_allclose(got[1, :, :2, 2:], np.log(1e-8), rtol=1e-6)
  np.testing.assert_allclose(np.exp(got[1, :, :2, :2]).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('heads', [(2, 2), (2, 4), (1, 3)])
def test_attention_level(heads):
  """Attention pairs are query affinities of the mapped maps; different head counts are averaged."""
  h_s, h_t = heads
  rng = np.random.default_rng(1)
  context = _context(((0, 2), (1, 0)))
  s_maps = tuple(_random_probs(rng, (B, h_s, L, L)) for _ in range(2))
  t_maps = tuple(_random_probs(rng, (B, h_t, L, L_OTHER)) for _ in range(3))
  student = {'attn': {'a': tuple(map(jnp.asarray, s_maps))}}
  teacher = {'attn': {'a': tuple(map(jnp.asarray, t_maps))}}
  pairs = LEVELS.get('attention')(student, teacher, context)
  assert sorted(pairs) == ['attention_0_2', 'attention_1_0']
  token_mask = np.asarray(context.token_mask)
  want_mask = token_mask * np.asarray(context.example_weight)[:, None]
  for s, t in context.layer_map:
    p = pairs[f'attention_{s}_{t}']
    want_s, want_t = _np_affinity(s_maps[s], token_mask), _np_affinity(t_maps[t], token_mask)
    if h_s != h_t:
      want_s, want_t = (np.log(np.mean(np.exp(x) - 1e-8, axis=1, keepdims=True) + 1e-8)
                        for x in (want_s, want_t))
    assert p.student.shape == p.teacher.shape == (B, 1 if h_s != h_t else h_s, L, L)
    np.testing.assert_allclose(p.student, want_s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p.teacher, want_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.broadcast_to(p.mask, p.student.shape[:-1]),
                                  np.broadcast_to(want_mask[:, None, :], p.student.shape[:-1]))
    assert not p.projectable


# ---------------------------------------------------------------- layer map


@pytest.mark.parametrize('student_depth,teacher_depth,want', [
    (2, 4, ((0, 1), (1, 3))),
    (3, 3, ((0, 0), (1, 1), (2, 2))),
    (1, 4, ((0, 3),)),
    (3, 4, ((0, 1), (1, 2), (2, 3))),
    (4, 2, ((0, 0), (1, 0), (2, 1), (3, 1))),
])
def test_default_layer_map(student_depth, teacher_depth, want):
  assert resolve_layer_map('', student_depth, teacher_depth) == want
  assert resolve_layer_map('  ', student_depth, teacher_depth) == want


def test_explicit_layer_map():
  assert resolve_layer_map('0:1,1:0', 2, 4) == ((0, 1), (1, 0))
  assert resolve_layer_map(' 1 : 3 ', 2, 4) == ((1, 3),)


@pytest.mark.parametrize('spec', ['2:0', '0:4', '-1:0', '0:-1', '0:1,1:9'])
def test_layer_map_out_of_range(spec):
  with pytest.raises(ValueError, match=r'config\.distill\.layer_map.*out of range'):
    resolve_layer_map(spec, 2, 4)


@pytest.mark.parametrize('spec', ['0-1', '0:1:2', 'a:b', '0:1,', '1', '0:x'])
def test_layer_map_malformed(spec):
  with pytest.raises(ValueError, match=r'config\.distill\.layer_map'):
    resolve_layer_map(spec, 2, 4)


# ---------------------------------------------------------------- terms and hyperparameters


def test_parse_terms_valid():
  terms = parse_terms(' logits:kl:1.0 , hidden:mse:0.5,,attention:l1:2 ')
  assert terms == (Term('logits', 'kl', 1.0), Term('hidden', 'mse', 0.5), Term('attention', 'l1', 2.0))
  assert [t.name for t in terms] == ['logits/kl', 'hidden/mse', 'attention/l1']
  assert parse_terms('') == ()


@pytest.mark.parametrize('spec,registry', [('nope:kl:1', LEVELS), ('logits:nope:1', METHODS)])
def test_parse_terms_unknown_name_lists_choices(spec, registry):
  with pytest.raises(ConfigError, match='nope') as info:
    parse_terms(spec)
  message = str(info.value)
  assert 'valid choices' in message
  assert all(name in message for name in registry.names())


@pytest.mark.parametrize('weight', ['0', '-1', '-0.5', 'abc', '', 'nan'])
def test_parse_terms_bad_weight(weight):
  with pytest.raises(ValueError, match=r'config\.distill\.terms'):
    parse_terms(f'logits:kl:{weight}')


@pytest.mark.parametrize('spec', ['logits:kl', 'logits:kl:1:2', 'logits'])
def test_parse_terms_malformed(spec):
  with pytest.raises(ValueError, match=r'config\.distill\.terms'):
    parse_terms(spec)


@pytest.mark.parametrize('spec, levels', [('hidden:dkd:1', 'logits'), ('pooled:kl:1', 'logits, attention'),
                                          ('logits:attention_transfer:1', 'hidden, attention')])
def test_parse_terms_refuses_a_method_at_a_level_it_makes_no_sense_at(spec, levels):
  """Caught before any training (dkd on hidden states used to crash after the baseline had trained)."""
  with pytest.raises(ValueError, match=f'config.distill.terms: {spec!r}: .*levels for .*: {levels}$'):
    parse_terms(spec)


def test_parse_terms_duplicate():
  with pytest.raises(ValueError, match='twice'):
    parse_terms('logits:kl:1,hidden:mse:1,logits:kl:2')
  # the same method at two levels is fine
  assert len(parse_terms('logits:mse:1,hidden:mse:1')) == 2


def test_validate_hparams():
  validate_hparams({'kl': {'temperature': 2.0}, 'dkd': {'alpha': 1.0, 'beta': 2.0},
                    'relational': {'distance_weight': 1.0, 'full_matrix': True}, 'attention_transfer': {'p': 1.0}})
  with pytest.raises(ConfigError, match=r'config\.distill\.hparams\.kl\.temprature.*temperature'):
    validate_hparams({'kl': {'temprature': 2.0}})
  with pytest.raises(ConfigError, match=r'hparams\.dkd\.labels'):
    validate_hparams({'dkd': {'labels': 1}})
  with pytest.raises(ConfigError, match=r'hparams\.mse\.scale'):
    validate_hparams({'mse': {'scale': 1.0}})
  with pytest.raises(ConfigError, match='valid choices'):
    validate_hparams({'nope': {}})
  for method, key in [('contrastive', 'temperature'), ('attention_transfer', 'p'), ('relational', 'angle_weight'),
                      ('dkd', 'beta')]:
    with pytest.raises(ConfigError, match=f'^config.distill.hparams.{method}.{key}=0.0 must be > 0$'):
      validate_hparams({method: {key: 0.0}})


def test_default_hparams_are_the_signatures():
  """config.distill.hparams starts from each method's signature: one place for a default."""
  hparams = default_hparams()
  assert hparams['kl'] == {'temperature': 4.0}
  assert hparams['dkd'] == {'temperature': 4.0, 'alpha': 1.0, 'beta': 8.0}
  assert hparams['relational'] == {'distance_weight': 1.0, 'angle_weight': 2.0, 'full_matrix': False}
  assert hparams['contrastive'] == {'temperature': 0.1, 'symmetric': False}
  assert hparams['attention_transfer'] == {'p': 2.0}
  assert 'mse' not in hparams  # no hyperparameters


def test_a_term_carries_its_own_hyperparameters():
  """'attention:kl:...:temperature=1' overrides the method's config value for that term only; what it
  leaves out comes from the config, then the signature."""
  terms = parse_terms('logits:kl:1.0,attention:kl:0.1:temperature=1,logits:dkd:1:beta=2.5:alpha=0.5')
  assert terms[1] == Term('attention', 'kl', 0.1, (('temperature', 1.0),))
  config = {'kl': {'temperature': 3.0}, 'dkd': {'temperature': 2.0}}
  assert term_hparams(terms[0], config) == {'temperature': 3.0}
  assert term_hparams(terms[1], config) == {'temperature': 1.0}
  assert term_hparams(terms[2], config) == {'temperature': 2.0, 'alpha': 0.5, 'beta': 2.5}
  assert term_hparams(terms[2], {}) == {'temperature': 4.0, 'alpha': 0.5, 'beta': 2.5}
  assert parse_terms('hidden:relational:1:full_matrix=true')[0].hparams == (('full_matrix', True),)


def test_per_term_hyperparameters_reach_the_method():
  """Two terms of one method with different temperatures give the method's loss at each."""
  rng = np.random.default_rng(0)
  s, t = (jnp.asarray(rng.normal(size=(B, C)), jnp.float32) for _ in range(2))
  pairs = {'logits': {'logits': Pair(s, t, jnp.ones(B), False)}}
  losses = distillation_losses(parse_terms('logits:kl:1:temperature=1.5'), pairs, {'kl': {'temperature': 3.0}},
                               jnp.zeros(B, jnp.int32))
  want = METHODS.get('kl')(s, t, None, temperature=1.5)
  np.testing.assert_allclose(float(losses['logits/kl']), float(want), rtol=1e-6)
  assert abs(float(want) - float(METHODS.get('kl')(s, t, None, temperature=3.0))) > 1e-3


@pytest.mark.parametrize('spec, message', [
    ('logits:kl:1:tau=1', "bad hyperparameter 'tau=1'; expected name=value with a name of kl: temperature"),
    ('logits:kl:1:temperature', "bad hyperparameter 'temperature'"),
    ('logits:kl:1:temperature=hot', "temperature='hot' is not a float"),
    ('logits:kl:1:temperature=0', "'logits:kl:1:temperature=0': temperature=0.0 must be > 0"),
    ('hidden:relational:1:full_matrix=maybe', "full_matrix='maybe' is not a bool"),
    ('logits:kl:1:temperature=1:temperature=2', 'sets a hyperparameter twice'),
    ('hidden:mse:1:scale=2', 'with a name of mse: none'),
])
def test_bad_per_term_hyperparameters(spec, message):
  with pytest.raises(ConfigError, match='^config.distill.terms: ') as error:
    parse_terms(spec)
  assert message in str(error.value)


def test_cacheable_only_where_every_level_declares_it():
  assert LEVELS.info('hidden').cacheable and cacheable(parse_terms('logits:kl:1,hidden:mse:1,attention:l1:1'))
  batch_level = 'test_levels_batch_normalised'

  @LEVELS.register(batch_level)  # default: not cacheable
  def normalised(student, teacher, context):
    del context
    return {'pooled': Pair(student['pooled'], teacher['pooled'] / teacher['pooled'].std(0), jnp.ones(B), True)}

  assert not LEVELS.info(batch_level).cacheable
  assert not cacheable(parse_terms(f'logits:kl:1,{batch_level}:mse:1'))
  with pytest.raises(ConfigError, match=r"distillation level 'x' .*cacheable='yes' must be True or False"):
    LEVELS.register('x', cacheable='yes')(normalised)


# ---------------------------------------------------------------- projection and losses


def _pairs():
  rng = np.random.default_rng(2)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = jnp.ones((B, L))
  return {'hidden': {'hidden_0_1': Pair(arr(B, L, W_S), arr(B, L, W_T), mask, True),
                     'hidden_1_3': Pair(arr(B, L, W_T), arr(B, L, W_T), mask, True)},
          'logits': {'logits': Pair(arr(B, C), arr(B, C + 2), jnp.ones(B), False)},
          'attention': {'attention_0_1': Pair(arr(B, 2, L, L), arr(B, 1, L, L), mask[:, None], False)}}


def test_projection_widths_only_projectable_and_different():
  assert projection_widths(_pairs()) == {'hidden_0_1': W_T}


def test_projector_maps_widths():
  """Projected pairs get the teacher's width via x @ kernel + bias; the rest pass unchanged."""
  pairs = _pairs()
  projector = Projector(projection_widths(pairs))
  params = projector.init(jax.random.key(0), pairs)
  out = projector.apply(params, pairs)
  kernel = np.asarray(params['params']['hidden_0_1']['kernel'], np.float64)
  bias = np.asarray(params['params']['hidden_0_1']['bias'], np.float64)
  assert kernel.shape == (W_S, W_T)
  assert list(params['params']) == ['hidden_0_1']
  p, q = out['hidden']['hidden_0_1'], pairs['hidden']['hidden_0_1']
  assert p.student.shape == (B, L, W_T)
  np.testing.assert_allclose(p.student, np.asarray(q.student, np.float64) @ kernel + bias, rtol=1e-5, atol=1e-6)
  assert p.teacher is q.teacher and p.mask is q.mask and p.projectable
  for level, name in [('hidden', 'hidden_1_3'), ('logits', 'logits'), ('attention', 'attention_0_1')]:
    np.testing.assert_array_equal(out[level][name].student, pairs[level][name].student)


def test_distillation_losses_average_pairs_and_route_labels():
  """Each term is its method averaged over the level's pairs, unweighted; only dkd gets labels."""
  pairs = _pairs()
  pairs['hidden']['hidden_0_1'] = pairs['hidden']['hidden_0_1'].replace(
      teacher=pairs['hidden']['hidden_0_1'].teacher[..., :W_S])
  pairs['logits']['logits'] = pairs['logits']['logits'].replace(
      teacher=pairs['logits']['logits'].teacher[:, :C])
  labels = jnp.asarray([0, 3, 5])
  terms = parse_terms('hidden:mse:0.5,logits:kl:3,logits:dkd:1')
  losses = distillation_losses(terms, pairs, {'kl': {'temperature': 2.0}}, labels)
  assert set(losses) == {'hidden/mse', 'logits/kl', 'logits/dkd'}
  mse = [np.mean((np.asarray(p.student, np.float64) - np.asarray(p.teacher, np.float64))**2)
         for p in pairs['hidden'].values()]
  np.testing.assert_allclose(float(losses['hidden/mse']), np.mean(mse), rtol=1e-5)
  logits = pairs['logits']['logits']
  np.testing.assert_allclose(float(losses['logits/kl']),
                             float(METHODS.get('kl')(logits.student, logits.teacher, None, temperature=2.0)),
                             rtol=1e-6)
  np.testing.assert_allclose(float(losses['logits/dkd']),
                             float(METHODS.get('dkd')(logits.student, logits.teacher, None, labels=labels)),
                             rtol=1e-6)


def test_collect_pairs_only_used_levels():
  """collect_pairs builds each level the terms name, once."""
  student, teacher = _fake_taps()
  terms = parse_terms('logits:kl:1,logits:mse:1,hidden:mse:1')
  pairs = collect_pairs(terms, student, teacher, _context())
  assert list(pairs) == ['logits', 'hidden']
  assert sorted(pairs['hidden']) == ['hidden_0_1', 'hidden_1_3']
