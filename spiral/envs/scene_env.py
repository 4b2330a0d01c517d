"""The MuJoCo scene environment: a program places coloured primitives on a floor (the paper's 3D domain).

Each agent step either places nothing (``flag`` 0) or places one primitive (``flag`` 1): a box,
sphere, cylinder or capsule of one of ``num_sizes`` sizes and a colour of ``color_bins``
levels per channel, resting on the floor cell ``location`` of a ``grid_size x grid_size``
grid (geometry in :mod:`spiral.envs.scene_model`). The scene is rendered from a fixed camera
under a fixed light into an ``image_size x image_size`` RGB image.

Rendering cost is what matters here, so nothing is rebuilt per episode:

* One :class:`SceneRenderer` holds one ``MjModel`` with ``episode_length - 1`` hidden object
  slots, one GL context and one offscreen framebuffer for the whole batch of N environments.
* Each environment's objects live in numpy arrays (:class:`ObjectSlots`); to render env ``i``
  its slots are written into the model in place, kinematics is recomputed and the scene is
  drawn into tile ``i`` of the framebuffer. One pixel read-back returns every tile.
* Only environments that placed an object re-render; a reset copies the cached empty-floor
  image without touching GL at all.

Headless GL: ``MUJOCO_GL=egl`` (the default here) renders on a GPU's EGL device or, without
one, on Mesa's llvmpipe. If EGL cannot initialise, the environment falls back to OSMesa and
logs a warning. That choice has to be made before ``mujoco`` is first imported (MuJoCo picks
its GL binding at import), so :func:`load_mujoco` probes EGL in a short subprocess once.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import subprocess
import sys
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from spiral.config import SceneConfig
from spiral.envs import scene_model
from spiral.envs.base import BatchedEnv
from spiral.envs.spec import FLAG_PLACE, scene_action_spec

logger = logging.getLogger(__name__)

MAX_FRAMEBUFFER_SIDE = 2048
"""Largest offscreen framebuffer side; bigger batches render in several passes."""

_LIVE_RENDERERS: "weakref.WeakSet[SceneRenderer]" = weakref.WeakSet()
"""Renderers not yet closed; freed at exit, before the GL bindings are torn down."""


@atexit.register
def _close_live_renderers() -> None:
    for renderer in list(_LIVE_RENDERERS):
        try:
            renderer.close()
        except Exception:  # best effort at exit
            pass

_EGL_PROBE = ("from mujoco.egl import GLContext\n"
              "context = GLContext(8, 8)\n"
              "context.make_current()\n"
              "context.free()\n")


def _egl_failure() -> str | None:
    """Try to create an EGL context in a child process; the reason it failed, or None if it works."""
    env = dict(os.environ, MUJOCO_GL="egl")
    env.pop("PYOPENGL_PLATFORM", None)
    try:
        probe = subprocess.run([sys.executable, "-c", _EGL_PROBE], env=env, capture_output=True,
                               text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"EGL probe did not run: {error}"
    if probe.returncode == 0:
        return None
    lines = [line for line in probe.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"EGL probe exited with status {probe.returncode}"


@functools.cache
def load_mujoco() -> ModuleType:
    """Import ``mujoco`` with a working headless GL backend and return the module.

    ``MUJOCO_GL`` defaults to ``egl``. When it is ``egl`` and ``mujoco`` has not been imported
    yet, EGL is probed in a child process first; if the probe fails, ``MUJOCO_GL`` and
    ``PYOPENGL_PLATFORM`` are switched to ``osmesa`` (with a warning) before the import.
    """
    requested = os.environ.setdefault("MUJOCO_GL", "egl").lower()
    if requested == "egl" and "mujoco" not in sys.modules:
        failure = _egl_failure()
        if failure is not None:
            logger.warning("MuJoCo EGL rendering failed to initialise (%s); falling back to OSMesa "
                           "software rendering", failure)
            os.environ["MUJOCO_GL"] = "osmesa"
            os.environ["PYOPENGL_PLATFORM"] = "osmesa"
    import mujoco

    return mujoco


@dataclass
class ObjectSlots:
    """The objects placed so far in each of N environments, one row of slots per environment.

    Attributes:
        count: ``[N]`` objects placed in each environment (slots ``0..count-1`` are visible).
        geom_type: ``[N, K]`` MuJoCo geom type of each slot.
        geom_size: ``[N, K, 3]`` MuJoCo geom size of each slot.
        pos: ``[N, K, 3]`` world position of each slot's centre.
        quat: ``[N, K, 4]`` orientation of each slot.
        rgba: ``[N, K, 4]`` colour of each slot; alpha 0 hides an unused slot.
        shape: ``[N, K]`` shape index (into ``SCENE_SHAPES``) of each placed object, -1 if unused.
        location: ``[N, K]`` grid location of each placed object, -1 if unused.
    """

    count: np.ndarray
    geom_type: np.ndarray
    geom_size: np.ndarray
    pos: np.ndarray
    quat: np.ndarray
    rgba: np.ndarray
    shape: np.ndarray
    location: np.ndarray

    @classmethod
    def empty(cls, num_envs: int, num_slots: int) -> "ObjectSlots":
        slots = cls(
            count=np.zeros(num_envs, np.int64),
            geom_type=np.zeros((num_envs, num_slots), np.int32),
            geom_size=np.zeros((num_envs, num_slots, 3)),
            pos=np.zeros((num_envs, num_slots, 3)),
            quat=np.zeros((num_envs, num_slots, 4)),
            rgba=np.zeros((num_envs, num_slots, 4)),
            shape=np.zeros((num_envs, num_slots), np.int64),
            location=np.zeros((num_envs, num_slots), np.int64),
        )
        slots.clear()
        return slots

    @property
    def num_slots(self) -> int:
        return self.geom_type.shape[1]

    def clear(self) -> None:
        """Empty every environment: all slots hidden, parked under the floor."""
        self.count[:] = 0
        self.geom_type[:] = scene_model.GEOM_BOX
        self.geom_size[:] = 0.1
        self.pos[:] = (0.0, 0.0, -1.0)
        self.quat[:] = (1.0, 0.0, 0.0, 0.0)
        self.rgba[:] = 0.0
        self.shape[:] = -1
        self.location[:] = -1


class SceneRenderer:
    """Renders the scenes of N environments from one model, GL context and framebuffer.

    Environments are drawn as ``image_size`` square tiles of one offscreen framebuffer (up to
    :data:`MAX_FRAMEBUFFER_SIDE` pixels a side; larger batches take several passes) and read
    back with one ``mjr_readPixels`` per pass.

    Args:
        image_size: Side of each rendered image in pixels.
        num_slots: Object slots in the model (the most objects one scene holds).
        max_tiles: The most environments rendered in one call.
        shadows: Whether the light casts shadows (an extra depth pass per render: about 2.7x the
            software-rendering cost, but objects look grounded on the floor).
        camera: Where the fixed camera is.
    """

    def __init__(self, image_size: int, num_slots: int, max_tiles: int, shadows: bool = True,
                 camera: scene_model.Camera = scene_model.DEFAULT_CAMERA) -> None:
        if image_size > MAX_FRAMEBUFFER_SIDE:
            raise ValueError(f"image_size must be <= {MAX_FRAMEBUFFER_SIDE}, got {image_size}")
        self._mj = load_mujoco()
        mj = self._mj
        self.image_size = image_size
        self.num_slots = num_slots
        tiles_per_side = MAX_FRAMEBUFFER_SIDE // image_size
        tiles_per_pass = min(max_tiles, tiles_per_side * tiles_per_side)
        self._tile_cols = min(tiles_per_pass, math.ceil(math.sqrt(tiles_per_pass)))
        self._tile_rows = math.ceil(tiles_per_pass / self._tile_cols)
        self._tiles_per_pass = tiles_per_pass
        width, height = self._tile_cols * image_size, self._tile_rows * image_size
        xml = scene_model.scene_xml(num_slots, width, height, shadow_map_size=4 * image_size if shadows else 0,
                                    camera=camera)
        self.model = mj.MjModel.from_xml_string(xml)
        self.data = mj.MjData(self.model)
        # Poses cameras and lights once (static); per render only geom frames are recomputed.
        mj.mj_forward(self.model, self.data)
        first = mj.mj_name2id(self.model, mj.mjtObj.mjOBJ_GEOM, "slot0")
        self._slots = slice(first, first + num_slots)
        first_material = mj.mj_name2id(self.model, mj.mjtObj.mjOBJ_MATERIAL, "slot0")
        self._slot_materials = slice(first_material, first_material + num_slots)

        self._camera = mj.MjvCamera()
        self._camera.type = mj.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = mj.mj_name2id(self.model, mj.mjtObj.mjOBJ_CAMERA, "view")
        self._option = mj.MjvOption()
        self._scene = mj.MjvScene(self.model, maxgeom=num_slots + 16)
        self._full_rect = mj.MjrRect(0, 0, width, height)
        self._tile_rects = [mj.MjrRect((k % self._tile_cols) * image_size,
                                       (k // self._tile_cols) * image_size, image_size, image_size)
                            for k in range(tiles_per_pass)]
        self._pixels = np.empty((height, width, 3), np.uint8)

        self._gl_context: Any = None
        self._mjr_context: Any = None
        try:
            self._gl_context = mj.GLContext(width, height)
            # A GL context is current in at most one thread. Each use makes it current and
            # releases it again (``as_current``), so the renderer may be built in one thread and
            # used in another (an actor builds its env in the main thread and steps it in its
            # guarded loop's thread), one at a time.
            with self._gl_context.as_current():
                self._mjr_context = mj.MjrContext(self.model, int(mj.mjtFontScale.mjFONTSCALE_100.value))
                mj.mjr_setBuffer(mj.mjtFramebuffer.mjFB_OFFSCREEN, self._mjr_context)
        except Exception as error:
            backend = os.environ.get("MUJOCO_GL", "")
            raise RuntimeError(
                f"could not create a MuJoCo {backend!r} GL context ({error}). The EGL-to-OSMesa fallback "
                "only works when spiral.envs.scene_env imports mujoco first; set MUJOCO_GL=osmesa to "
                "force software rendering") from error
        _LIVE_RENDERERS.add(self)

    def render(self, slots: ObjectSlots, envs: np.ndarray) -> np.ndarray:
        """Render the scenes of environments ``envs`` (indices into ``slots``): ``[len(envs), S, S, 3]`` uint8."""
        if self._mjr_context is None:
            raise RuntimeError("render() called after close()")
        s = self.image_size
        envs = np.asarray(envs, dtype=np.int64)
        images = np.empty((len(envs), s, s, 3), np.uint8)
        with self._gl_context.as_current():
            self._render_tiles(slots, envs, images)
        return images

    def _render_tiles(self, slots: ObjectSlots, envs: np.ndarray, images: np.ndarray) -> None:
        """Render into ``images`` with the GL context current, as many tiles per pass as fit."""
        mj, model, s = self._mj, self.model, self.image_size
        for start in range(0, len(envs), self._tiles_per_pass):
            chunk = envs[start:start + self._tiles_per_pass]
            for tile, env in enumerate(chunk):
                model.geom_type[self._slots] = slots.geom_type[env]
                model.geom_size[self._slots] = slots.geom_size[env]
                model.geom_pos[self._slots] = slots.pos[env]
                model.geom_quat[self._slots] = slots.quat[env]
                model.geom_rgba[self._slots] = slots.rgba[env]
                model.mat_rgba[self._slot_materials] = slots.rgba[env]
                mj.mj_kinematics(model, self.data)
                mj.mjv_updateScene(model, self.data, self._option, None, self._camera,
                                   mj.mjtCatBit.mjCAT_ALL, self._scene)
                mj.mjr_render(self._tile_rects[tile], self._scene, self._mjr_context)
            mj.mjr_readPixels(self._pixels, None, self._full_rect, self._mjr_context)
            # OpenGL's rows run bottom-up: flip, then cut the tiles out.
            pixels = self._pixels[::-1]
            height = self._pixels.shape[0]
            for tile in range(len(chunk)):
                rect = self._tile_rects[tile]
                top = height - rect.bottom - s
                images[start + tile] = pixels[top:top + s, rect.left:rect.left + s]

    def close(self) -> None:
        """Free the MuJoCo render context and the GL context (idempotent)."""
        if self._mjr_context is not None:
            with self._gl_context.as_current():
                self._mjr_context.free()
            self._mjr_context = None
        if self._gl_context is not None:
            self._gl_context.free()
            self._gl_context = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: GL libraries may already be gone
            pass


def scene_camera(scene: SceneConfig) -> scene_model.Camera:
    """The camera a scene layout asks for (``camera_pitch_degrees``, ``frame_grid``)."""
    if scene.frame_grid:
        return scene_model.Camera.framing_grid(scene.camera_pitch_degrees)
    return scene_model.Camera(pitch_degrees=scene.camera_pitch_degrees)


class SceneEnv(BatchedEnv):
    """N MuJoCo scenes stepped together; each placing step adds one primitive to a scene.

    Args:
        scene: Image size, grid, sizes and colour bins.
        num_envs: N, the batch size.
        episode_length: Steps per episode including the reset (at most ``episode_length - 1`` objects).
        noise_dim: Size of the per-episode noise sample.
        seed: Seed of the noise generator (rendering itself is deterministic).
        shadows: Whether objects cast shadows (see :class:`SceneRenderer`).
    """

    def __init__(self, scene: SceneConfig, num_envs: int, episode_length: int, noise_dim: int,
                 seed: int | None = None, shadows: bool = True) -> None:
        scene.validate("scene")
        spec = scene_action_spec(scene.grid_size, scene.num_sizes, scene.color_bins)
        size = scene.image_size
        super().__init__(spec, num_envs, (size, size, 3), episode_length, noise_dim, seed)
        self.scene = scene
        self._col = {name: spec.index(name) for name in spec.names}
        self._sizes = scene_model.size_values(scene.num_sizes)
        self._colors = scene_model.color_values(scene.color_bins)
        self._slots = ObjectSlots.empty(num_envs, self.steps_per_episode)
        self._renderer = SceneRenderer(size, self.steps_per_episode, max_tiles=num_envs, shadows=shadows,
                                       camera=scene_camera(scene))
        self._empty_image = self._renderer.render(self._slots, np.zeros(1, np.int64))[0]
        self._images = np.broadcast_to(self._empty_image, (num_envs, size, size, 3)).copy()

    @property
    def objects(self) -> ObjectSlots:
        """The objects placed so far in each environment (read-only view by convention)."""
        return self._slots

    @property
    def empty_image(self) -> np.ndarray:
        """The render of the empty floor, ``[S, S, 3]`` uint8 (a copy)."""
        return self._empty_image.copy()

    def _clear(self) -> None:
        self._slots.clear()
        self._images[:] = self._empty_image

    def _execute(self, actions: np.ndarray) -> None:
        envs = np.flatnonzero(actions[:, self._col["flag"]] == FLAG_PLACE)
        if envs.size == 0:
            return
        chosen = actions[envs]
        slot = self._slots.count[envs]
        if slot.max() >= self._slots.num_slots:
            raise RuntimeError(f"scene holds at most {self._slots.num_slots} objects")
        location = chosen[:, self._col["location"]]
        shape = chosen[:, self._col["shape"]]
        geom_type, geom_size, center_z, quat = scene_model.primitive_geometry(
            shape, self._sizes[chosen[:, self._col["size"]]])
        xy = scene_model.cell_centers(location, self.scene.grid_size)
        rgb = np.stack([self._colors[chosen[:, self._col[c]]] for c in ("red", "green", "blue")], axis=-1)

        s = self._slots
        s.geom_type[envs, slot] = geom_type
        s.geom_size[envs, slot] = geom_size
        s.pos[envs, slot] = np.concatenate([xy, center_z[:, None]], axis=-1)
        s.quat[envs, slot] = quat
        s.rgba[envs, slot] = np.concatenate([rgb, np.ones((len(envs), 1))], axis=-1)
        s.shape[envs, slot] = shape
        s.location[envs, slot] = location
        s.count[envs] += 1
        self._images[envs] = self._renderer.render(s, envs)

    def _read(self) -> np.ndarray:
        return self._images.copy()

    def close(self) -> None:
        self._renderer.close()
