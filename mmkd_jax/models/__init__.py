"""Flax Linen teacher and student models, looked up by name."""
from mmkd_jax.models.student import Student
from mmkd_jax.models.teacher import Teacher
from mmkd_jax.registry import Registry

MODELS: Registry[type] = Registry('model')
MODELS.register('teacher')(Teacher)
MODELS.register('student')(Student)

__all__ = ['MODELS', 'Student', 'Teacher']
