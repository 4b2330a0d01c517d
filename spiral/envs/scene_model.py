"""The 3D scene: a floor, a fixed camera and light, and a pool of object slots (MJCF + geometry).

The scene environment (:mod:`spiral.envs.scene_env`) builds one MuJoCo model from
:func:`scene_xml` and never rebuilds it. Every object an episode can place has a *slot*: a
geom of the world body that is invisible (alpha 0) until an object is placed in it, at which
point its type, size, position, orientation and colour are written into the model in place.

This module holds the pure geometry that maps an action to a primitive (no MuJoCo import, so
it costs nothing to load):

* ``location`` is a flat index ``i`` on a ``G x G`` grid, the cell ``(row, col) = (i // G, i % G)``.
  Cells tile the square ``[-FLOOR_HALF_EXTENT, FLOOR_HALF_EXTENT]^2`` of the floor; ``col``
  grows along world ``+x`` (left to right in the image) and ``row`` along world ``-y`` (far to
  near, i.e. top to bottom in the image), so the image roughly keeps the grid's layout.
* ``shape`` picks one of :data:`spiral.envs.spec.SCENE_SHAPES`; ``size`` one of
  :func:`size_values`; ``red``/``green``/``blue`` each pick one of :func:`color_values`.
* Every object rests on the floor, upright (the capsule lies along ``x``); objects placed on
  the same cells interpenetrate rather than stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spiral.envs.spec import SCENE_SHAPES

FLOOR_HALF_EXTENT = 1.0
"""Half width of the square of floor the location grid covers (metres)."""
SIZE_RANGE = (0.12, 0.3)
"""Smallest and largest characteristic half extent of an object (metres)."""

# MuJoCo's mjtGeom values (stable across releases; checked against mujoco in the tests).
GEOM_SPHERE = 2
GEOM_CAPSULE = 3
GEOM_CYLINDER = 5
GEOM_BOX = 6
SHAPE_GEOM_TYPES = np.array([GEOM_BOX, GEOM_SPHERE, GEOM_CYLINDER, GEOM_CAPSULE], np.int32)
"""MuJoCo geom type of each entry of :data:`SCENE_SHAPES`, in the same order."""
assert len(SHAPE_GEOM_TYPES) == len(SCENE_SHAPES)

CAMERA_PITCH_DEGREES = 55.0
"""How far below the horizon the fixed camera looks (the default camera)."""
CAMERA_DISTANCE = 4.2
"""Distance from the default camera to the point it looks at (the middle of the grid)."""
CAMERA_FOVY_DEGREES = 45.0
LIGHT_DIRECTION = (-0.4, -0.2, -1.0)
"""Direction of the fixed directional light: from above, behind and right of the camera."""
FLOOR_RGB = (0.55, 0.55, 0.55)
"""Colour of the floor; objects keep their own colour under the same light."""

_IDENTITY_QUAT = np.array([1.0, 0.0, 0.0, 0.0])
_LYING_ALONG_X_QUAT = np.array([math.cos(math.pi / 4), 0.0, math.sin(math.pi / 4), 0.0])
"""A 90 degree turn about ``y``: a capsule's axis (``z``) then lies along ``x``."""


def size_values(num_sizes: int) -> np.ndarray:
    """The ``num_sizes`` characteristic half extents the ``size`` head indexes (metres)."""
    if num_sizes < 1:
        raise ValueError(f"num_sizes must be >= 1, got {num_sizes}")
    if num_sizes == 1:
        return np.array([sum(SIZE_RANGE) / 2])
    return np.linspace(SIZE_RANGE[0], SIZE_RANGE[1], num_sizes)


def color_values(color_bins: int) -> np.ndarray:
    """The ``color_bins`` channel intensities in ``[0, 1]`` each colour head indexes."""
    if color_bins < 2:
        raise ValueError(f"color_bins must be >= 2, got {color_bins}")
    return np.linspace(0.0, 1.0, color_bins)


def cell_centers(location: np.ndarray, grid_size: int) -> np.ndarray:
    """Flat grid indices ``[N]`` to world ``(x, y)`` floor coordinates ``[N, 2]`` of the cells' centres."""
    location = np.asarray(location, dtype=np.int64)
    if location.size and (location.min() < 0 or location.max() >= grid_size * grid_size):
        raise ValueError(f"locations must be in [0, {grid_size * grid_size}), "
                         f"got [{location.min()}, {location.max()}]")
    row, col = location // grid_size, location % grid_size
    cell = 2.0 * FLOOR_HALF_EXTENT / grid_size
    x = -FLOOR_HALF_EXTENT + (col + 0.5) * cell
    y = FLOOR_HALF_EXTENT - (row + 0.5) * cell
    return np.stack([x, y], axis=-1)


def primitive_geometry(shape: np.ndarray, half_extent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Geom type, MuJoCo size, height of the centre and orientation of primitives resting on the floor.

    Args:
        shape: ``[N]`` indices into :data:`SCENE_SHAPES`.
        half_extent: ``[N]`` characteristic half extents (from :func:`size_values`).

    Returns:
        ``(geom_type [N] int32, geom_size [N, 3], center_z [N], quat [N, 4])``: a box is a cube
        of half side ``s``; a sphere has radius ``s``; a cylinder radius ``s`` and half height
        ``s``; a capsule radius ``s / 2`` and a half-length ``s`` lying along ``x``.
    """
    shape = np.asarray(shape, dtype=np.int64)
    s = np.asarray(half_extent, dtype=np.float64)
    if shape.size and (shape.min() < 0 or shape.max() >= len(SCENE_SHAPES)):
        raise ValueError(f"shapes must be in [0, {len(SCENE_SHAPES)}) {SCENE_SHAPES}, "
                         f"got [{shape.min()}, {shape.max()}]")
    n = shape.shape[0]
    geom_type = SHAPE_GEOM_TYPES[shape]
    size = np.zeros((n, 3))
    center_z = s.copy()
    quat = np.tile(_IDENTITY_QUAT, (n, 1))
    is_box = geom_type == GEOM_BOX
    size[is_box] = s[is_box, None]
    is_sphere = geom_type == GEOM_SPHERE
    size[is_sphere, 0] = s[is_sphere]
    is_cylinder = geom_type == GEOM_CYLINDER
    size[is_cylinder, 0] = s[is_cylinder]
    size[is_cylinder, 1] = s[is_cylinder]
    is_capsule = geom_type == GEOM_CAPSULE
    size[is_capsule, 0] = s[is_capsule] / 2
    size[is_capsule, 1] = s[is_capsule]
    center_z[is_capsule] = s[is_capsule] / 2
    quat[is_capsule] = _LYING_ALONG_X_QUAT
    return geom_type.astype(np.int32), size, center_z, quat


@dataclass(frozen=True)
class Camera:
    """The fixed camera: it looks at the middle of the grid from the ``-y`` side.

    Attributes:
        pitch_degrees: How far below the horizon it looks (90: straight down).
        distance: From the camera to the middle of the grid (metres).
        fovy_degrees: Vertical field of view.
    """

    pitch_degrees: float = CAMERA_PITCH_DEGREES
    distance: float = CAMERA_DISTANCE
    fovy_degrees: float = CAMERA_FOVY_DEGREES

    def __post_init__(self) -> None:
        if not 0 < self.pitch_degrees <= 90:
            raise ValueError(f"camera pitch must be in (0, 90] degrees, got {self.pitch_degrees}")
        if self.distance <= 0 or not 0 < self.fovy_degrees < 180:
            raise ValueError(f"camera distance must be > 0 and field of view in (0, 180), got "
                             f"{self.distance}, {self.fovy_degrees}")

    @classmethod
    def framing_grid(cls, pitch_degrees: float, fovy_degrees: float = CAMERA_FOVY_DEGREES) -> "Camera":
        """The camera at ``pitch_degrees`` as close as it can be with the whole grid in view.

        The square of floor that the location grid covers then fills the image: its near edge
        touches the image's bottom corners (or, looking straight down, its sides touch the
        image's sides). Looking down steeply, cell ``(row, col)`` then lies near the image's
        ``(row, col)`` block, as a canvas's grid cell does for painting.
        """
        low, high = 0.5, 100.0  # the grid's extent in the image shrinks as the distance grows
        for _ in range(60):
            middle = (low + high) / 2
            if cls(pitch_degrees, middle, fovy_degrees).grid_extent() > 1.0:
                low = middle
            else:
                high = middle
        return cls(pitch_degrees, high, fovy_degrees)

    def pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Position and ``xyaxes`` (camera right and up in world frame), as MJCF's camera takes them.

        The far row of cells is at the top of the image and column 0 on the left.
        """
        pitch = math.radians(self.pitch_degrees)
        view_direction = np.array([0.0, math.cos(pitch), -math.sin(pitch)])
        position = -self.distance * view_direction
        right = np.array([1.0, 0.0, 0.0])
        up = np.array([0.0, math.sin(pitch), math.cos(pitch)])
        return position, np.concatenate([right, up])

    def project(self, world: np.ndarray) -> np.ndarray:
        """World points ``[N, 3]`` to image coordinates ``[N, 2]`` (x right, y down) in [-1, 1] at the edges."""
        position, axes = self.pose()
        right, up = axes[:3], axes[3:]
        forward = -np.cross(right, up)  # MuJoCo cameras look along their -z axis, z = x cross y
        d = np.asarray(world, dtype=np.float64) - position
        focal = 1.0 / math.tan(math.radians(self.fovy_degrees) / 2)
        depth = d @ forward
        return np.stack([focal * (d @ right) / depth, -focal * (d @ up) / depth], axis=-1)

    def grid_extent(self) -> float:
        """The largest image coordinate of the grid's corners (1.0: it touches the image's edge)."""
        corners = np.array([[x, y, 0.0] for x in (-FLOOR_HALF_EXTENT, FLOOR_HALF_EXTENT)
                            for y in (-FLOOR_HALF_EXTENT, FLOOR_HALF_EXTENT)])
        return float(np.abs(self.project(corners)).max())


DEFAULT_CAMERA = Camera()
"""The camera of every scene experiment that sets no other: pitch 55 degrees, 4.2 m away.
The grid then covers the middle ~36 x 27 pixels of a 64-pixel image."""


def camera_pose(camera: Camera = DEFAULT_CAMERA) -> tuple[np.ndarray, np.ndarray]:
    """Position and ``xyaxes`` of ``camera`` (:meth:`Camera.pose`)."""
    return camera.pose()


def _fmt(values: np.ndarray | tuple[float, ...]) -> str:
    return " ".join(f"{float(v):.6g}" for v in values)


def scene_xml(num_slots: int, framebuffer_width: int, framebuffer_height: int, shadow_map_size: int,
              camera: Camera = DEFAULT_CAMERA) -> str:
    """The MJCF of the scene: floor, light, camera ``"view"`` and ``num_slots`` hidden object slots.

    Slot ``k`` is the geom named ``slot{k}`` with its own material ``slot{k}`` (both are
    recoloured together, so the material's colour never overrides the geom's). Slots do not
    collide: the model is only ever posed (kinematics), never simulated.

    Args:
        num_slots: Objects an episode can hold at most.
        framebuffer_width: Width of the offscreen framebuffer (all tiles of one render pass).
        framebuffer_height: Height of the offscreen framebuffer.
        shadow_map_size: Side of the light's shadow map in texels (0 turns shadows off).
        camera: Where the fixed camera ``"view"`` is.
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    camera_position, camera_axes = camera.pose()
    materials = "\n".join(
        f'    <material name="slot{k}" rgba="1 1 1 0" specular="0.2" shininess="0.3"/>' for k in range(num_slots))
    slots = "\n".join(
        f'    <geom name="slot{k}" type="box" size="0.1 0.1 0.1" pos="0 0 -1" material="slot{k}" '
        f'rgba="1 1 1 0" contype="0" conaffinity="0"/>' for k in range(num_slots))
    cast_shadow = "true" if shadow_map_size > 0 else "false"
    return f"""<mujoco model="spiral_scene">
  <statistic center="0 0 0" extent="6"/>
  <visual>
    <global offwidth="{framebuffer_width}" offheight="{framebuffer_height}" fovy="{camera.fovy_degrees:g}"/>
    <quality shadowsize="{max(shadow_map_size, 1)}" offsamples="0"/>
    <headlight ambient="0.4 0.4 0.4" diffuse="0.3 0.3 0.3" specular="0 0 0"/>
  </visual>
  <asset>
    <material name="floor" rgba="{_fmt(FLOOR_RGB)} 1" specular="0" shininess="0"/>
{materials}
  </asset>
  <worldbody>
    <light name="sun" directional="true" pos="0 0 5" dir="{_fmt(LIGHT_DIRECTION)}" diffuse="0.5 0.5 0.5"
           specular="0.1 0.1 0.1" castshadow="{cast_shadow}"/>
    <geom name="floor" type="plane" size="10 10 0.1" material="floor" contype="0" conaffinity="0"/>
{slots}
    <camera name="view" pos="{_fmt(camera_position)}" xyaxes="{_fmt(camera_axes)}" fovy="{camera.fovy_degrees:g}"/>
  </worldbody>
</mujoco>
"""
