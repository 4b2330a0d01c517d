"""Shared test set-up: one OpenMP thread per process and headless MuJoCo."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
