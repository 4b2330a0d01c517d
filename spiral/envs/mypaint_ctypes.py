"""A ctypes binding of libmypaint 1.6 (Debian's ``libmypaint-dev``): surfaces, brushes, pixels.

libmypaint is MyPaint's brush engine, the renderer of the SPIRAL paper. Only the small part of
its C API that an environment needs is bound here, with explicit ``argtypes``/``restype`` so
that every call is checked and none goes through ctypes' slow default conversions:

* :class:`FixedSurface` wraps ``MyPaintFixedTiledSurface``: a fixed-size canvas stored as
  ``T x T`` pixel tiles (``T = 64``) in one contiguous block of ``uint16`` RGBA. Pixels are
  *fix15* (``1 << 15`` is 1.0) and *premultiplied* by alpha. :meth:`FixedSurface.pixels` is a
  zero-copy numpy view of that block, laid out ``[H, W, 4]``; writes to it change the canvas.
* :class:`Brush` wraps ``MyPaintBrush``: settings loaded from a ``.myb`` JSON file, base
  values set by setting name (``radius_logarithmic``, ``color_h``, ...), and
  ``mypaint_brush_stroke_to``, which moves the simulated pen to ``(x, y)`` with a pressure
  over ``dtime`` seconds and stamps the dabs the brush's dynamics ask for. Dabs are queued and
  only rendered into the tiles by ``end_atomic``, so every batch of strokes is bracketed by
  :meth:`FixedSurface.begin_atomic` / :meth:`FixedSurface.end_atomic`.
* :func:`fix15_to_uint8` converts the premultiplied fix15 buffer to uint8, exactly as
  libmypaint's own ``fix15_to_rgba8`` (un-premultiply, then round to 8 bits).

Three libmypaint 1.6 facts the callers must know:

* A new fixed surface is filled with ``0xFFFF``, which is not fix15 white (``0x8000``) and
  converts to garbage; :meth:`FixedSurface.clear` fills it with real white (all four channels
  ``1 << 15``), and the constructor calls it.
* The brush seeds its private random generator (dab jitter) once, in ``mypaint_brush_new``;
  ``mypaint_brush_reset`` does not reseed it. A brush that must draw reproducibly from a known
  state is therefore re-created (:meth:`Brush.reload`), not reset.
* libmypaint links libgomp and renders dirty tiles with an OpenMP ``parallel for`` (only when
  more than three tiles are dirty, so a 64x64 canvas, one tile, never forks). Actors run one
  process per core and should set ``OMP_NUM_THREADS=1`` before starting;
  :func:`set_openmp_threads` sets the thread count of libmypaint's libgomp for the calling
  thread without touching the environment (torch bundles its own libgomp copy).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import POINTER, Structure, c_char_p, c_double, c_float, c_int, c_uint16, c_void_p
from pathlib import Path

import numpy as np

FIX15_ONE = 1 << 15
"""1.0 in libmypaint's 15-bit fixed point."""

_LIBRARY_CANDIDATES = ("libmypaint-1.5.so.1", "libmypaint.so", "libmypaint-1.6.so.1")


class MyPaintRectangle(Structure):
    """``MyPaintRectangle``: an integer ``(x, y, width, height)`` box of pixels."""

    _fields_ = [("x", c_int), ("y", c_int), ("width", c_int), ("height", c_int)]


class MyPaintTileRequest(Structure):
    """``MyPaintTileRequest``: asks a tiled surface for the buffer of tile ``(tx, ty)``."""

    _fields_ = [("tx", c_int), ("ty", c_int), ("readonly", c_int), ("buffer", POINTER(c_uint16)),
                ("context", c_void_p), ("thread_id", c_int), ("mipmap_level", c_int)]


class LibMyPaintError(RuntimeError):
    """libmypaint is missing or one of its calls failed."""


def _find_library() -> str:
    override = os.environ.get("SPIRAL_LIBMYPAINT")
    if override:
        return override
    found = ctypes.util.find_library("mypaint")
    if found:
        return found
    for name in _LIBRARY_CANDIDATES:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    raise LibMyPaintError("libmypaint was not found: install the Debian package libmypaint-dev "
                          "(and mypaint-brushes for the .myb files), or set SPIRAL_LIBMYPAINT to the .so path")


class _Lib:
    """The loaded shared library with typed function pointers (bound once, reused by every call)."""

    def __init__(self, path: str) -> None:
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise LibMyPaintError(f"cannot load libmypaint from {path!r}: {exc}") from exc
        self.path = path
        self.lib = lib

        def fn(name: str, restype: object, *argtypes: object) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
            f = getattr(lib, name)
            f.restype = restype
            f.argtypes = list(argtypes)
            return f

        # Surfaces.
        self.fixed_tiled_surface_new = fn("mypaint_fixed_tiled_surface_new", c_void_p, c_int, c_int)
        self.fixed_tiled_surface_interface = fn("mypaint_fixed_tiled_surface_interface", c_void_p, c_void_p)
        self.fixed_tiled_surface_get_width = fn("mypaint_fixed_tiled_surface_get_width", c_int, c_void_p)
        self.fixed_tiled_surface_get_height = fn("mypaint_fixed_tiled_surface_get_height", c_int, c_void_p)
        self.surface_begin_atomic = fn("mypaint_surface_begin_atomic", None, c_void_p)
        self.surface_end_atomic = fn("mypaint_surface_end_atomic", None, c_void_p, POINTER(MyPaintRectangle))
        self.surface_unref = fn("mypaint_surface_unref", None, c_void_p)
        self.tile_request_init = fn("mypaint_tile_request_init", None, POINTER(MyPaintTileRequest),
                                    c_int, c_int, c_int, c_int)
        self.tiled_surface_tile_request_start = fn("mypaint_tiled_surface_tile_request_start", None,
                                                   c_void_p, POINTER(MyPaintTileRequest))
        self.tiled_surface_tile_request_end = fn("mypaint_tiled_surface_tile_request_end", None,
                                                 c_void_p, POINTER(MyPaintTileRequest))
        # Brushes.
        self.brush_new = fn("mypaint_brush_new", c_void_p)
        self.brush_unref = fn("mypaint_brush_unref", None, c_void_p)
        self.brush_from_string = fn("mypaint_brush_from_string", c_int, c_void_p, c_char_p)
        self.brush_from_defaults = fn("mypaint_brush_from_defaults", None, c_void_p)
        self.brush_setting_from_cname = fn("mypaint_brush_setting_from_cname", c_int, c_char_p)
        self.brush_set_base_value = fn("mypaint_brush_set_base_value", None, c_void_p, c_int, c_float)
        self.brush_get_base_value = fn("mypaint_brush_get_base_value", c_float, c_void_p, c_int)
        self.brush_reset = fn("mypaint_brush_reset", None, c_void_p)
        self.brush_new_stroke = fn("mypaint_brush_new_stroke", None, c_void_p)
        # libmypaint 1.6: (brush, surface, x, y, pressure, xtilt, ytilt, dtime). The 1.6-only
        # mypaint_brush_stroke_to_2 adds viewzoom/viewrotation/barrel_rotation but needs a
        # MyPaintSurface2; the fixed tiled surface implements the classic interface.
        self.brush_stroke_to = fn("mypaint_brush_stroke_to", c_int, c_void_p, c_void_p, c_float, c_float,
                                  c_float, c_float, c_float, c_double)


_LIB: _Lib | None = None


def library() -> _Lib:
    """The process-wide libmypaint binding (loaded on first use)."""
    global _LIB
    if _LIB is None:
        _LIB = _Lib(_find_library())
    return _LIB


def set_openmp_threads(num_threads: int) -> bool:
    """Set libmypaint's OpenMP thread count for the calling thread; False if libgomp is absent."""
    lib = library().lib
    try:
        setter = lib.omp_set_num_threads
    except AttributeError:
        try:
            setter = ctypes.CDLL("libgomp.so.1").omp_set_num_threads
        except (OSError, AttributeError):
            return False
    setter.argtypes = [c_int]
    setter.restype = None
    setter(int(num_threads))
    return True


class FixedSurface:
    """A ``width x height`` libmypaint canvas with a zero-copy pixel view.

    Attributes:
        width, height: Canvas size in pixels.
        tile_size: Side of a libmypaint tile in pixels.
        handle: The ``MyPaintSurface *`` to pass to :meth:`Brush.stroke_to`.
    """

    def __init__(self, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"surface size must be positive, got {width}x{height}")
        self._lib = library()
        self._fixed = self._lib.fixed_tiled_surface_new(int(width), int(height))
        if not self._fixed:
            raise LibMyPaintError(f"mypaint_fixed_tiled_surface_new({width}, {height}) failed")
        self.handle: int = self._lib.fixed_tiled_surface_interface(self._fixed)
        self.width = self._lib.fixed_tiled_surface_get_width(self._fixed)
        self.height = self._lib.fixed_tiled_surface_get_height(self._fixed)
        self._roi = MyPaintRectangle()
        self._tiles = self._map_tiles()
        # One tile row: [1, tx, T, T, 4] -> [T, tx*T, 4] needs no copy only when tx == 1 too;
        # a single-tile canvas (up to 64x64) gets a true view, larger ones are assembled per read.
        ty, tx = self._tiles.shape[:2]
        self._single_tile = ty == 1 and tx == 1
        self._pixels = self._tiles[0, 0, :self.height, :self.width] if self._single_tile else None
        self.clear()

    def _map_tiles(self) -> np.ndarray:
        """``[tiles_y, tiles_x, T, T, 4]`` uint16 view of the surface's tile block.

        The fixed tiled surface keeps its tiles row-major in one allocation; each tile's address
        is asked through the public tile-request API and checked against that layout.
        """
        lib = self._lib
        request = MyPaintTileRequest()

        def tile_address(tx: int, ty: int) -> int:
            lib.tile_request_init(ctypes.byref(request), 0, tx, ty, 1)
            lib.tiled_surface_tile_request_start(self.handle, ctypes.byref(request))
            address = ctypes.cast(request.buffer, c_void_p).value or 0
            lib.tiled_surface_tile_request_end(self.handle, ctypes.byref(request))
            return address

        base = tile_address(0, 0)
        if not base:
            raise LibMyPaintError("the surface returned no buffer for tile (0, 0)")
        # MYPAINT_TILE_SIZE; not exported as a symbol, so it is checked below through the
        # addresses the surface hands out for every tile.
        self.tile_size = 64
        tiles_x = -(-self.width // self.tile_size)
        tiles_y = -(-self.height // self.tile_size)
        tile_bytes = self.tile_size * self.tile_size * 4 * 2
        for ty in range(tiles_y):
            for tx in range(tiles_x):
                expected = base + (ty * tiles_x + tx) * tile_bytes
                if tile_address(tx, ty) != expected:
                    raise LibMyPaintError(f"unexpected tile layout at tile ({tx}, {ty}) of a {self.width}x{self.height} "
                                          "surface; this is not the libmypaint 1.x fixed tiled surface this binding knows")
        count = tiles_y * tiles_x * self.tile_size * self.tile_size * 4
        flat = np.ctypeslib.as_array(ctypes.cast(base, POINTER(c_uint16)), shape=(count,))
        return flat.reshape(tiles_y, tiles_x, self.tile_size, self.tile_size, 4)

    def pixels(self) -> np.ndarray:
        """``[H, W, 4]`` uint16 premultiplied fix15 RGBA canvas, meaningful after :meth:`end_atomic`.

        For a single-tile canvas (at most 64x64) this is a zero-copy view into libmypaint's
        memory, valid while the surface lives; larger canvases are assembled from their tiles
        into a new array.
        """
        if self._pixels is not None:
            return self._pixels
        ty, tx, t = self._tiles.shape[0], self._tiles.shape[1], self.tile_size
        return self._tiles.transpose(0, 2, 1, 3, 4).reshape(ty * t, tx * t, 4)[:self.height, :self.width]

    def clear(self, value: int = FIX15_ONE) -> None:
        """Fill every channel (alpha included) with ``value``: opaque white by default."""
        self._tiles[...] = value

    def begin_atomic(self) -> None:
        """Open a batch of stroke operations (dabs are queued, not drawn)."""
        self._lib.surface_begin_atomic(self.handle)

    def end_atomic(self) -> MyPaintRectangle:
        """Render the queued dabs into the tiles; returns the dirty box."""
        self._lib.surface_end_atomic(self.handle, ctypes.byref(self._roi))
        return self._roi

    def close(self) -> None:
        """Release the C surface (the pixel view must not be used afterwards)."""
        if self._fixed:
            self._tiles = np.zeros((1, 1, 0, 0, 4), np.uint16)
            self._pixels = np.zeros((0, 0, 4), np.uint16)
            self._lib.surface_unref(self.handle)
            self._fixed = None
            self.handle = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Brush:
    """A libmypaint brush loaded from a ``.myb`` file.

    Args:
        myb_text: The brush file's JSON text (see :func:`load_brush_text`).
    """

    def __init__(self, myb_text: str) -> None:
        self._lib = library()
        self._text = myb_text.encode("utf-8")
        self._settings: dict[str, int] = {}
        self._base_values: dict[int, float] = {}
        self.handle: int = 0
        self.stroke_to_fn = self._lib.brush_stroke_to
        self.reload()

    def reload(self) -> None:
        """Re-create the C brush from the file text and re-apply the base values set so far.

        This restores a fresh brush state including libmypaint's dab random generator, which
        ``mypaint_brush_reset`` keeps, so that an episode's strokes do not depend on the past.
        """
        old = self.handle
        handle = self._lib.brush_new()
        if not handle:
            raise LibMyPaintError("mypaint_brush_new failed")
        if not self._lib.brush_from_string(handle, self._text):
            self._lib.brush_unref(handle)
            raise LibMyPaintError("mypaint_brush_from_string rejected the brush file (not MyPaint brush JSON?)")
        for setting, value in self._base_values.items():
            self._lib.brush_set_base_value(handle, setting, value)
        self.handle = handle
        if old:
            self._lib.brush_unref(old)

    def setting_id(self, cname: str) -> int:
        """The ``MyPaintBrushSetting`` id of a setting name such as ``radius_logarithmic``."""
        sid = self._settings.get(cname)
        if sid is None:
            sid = self._lib.brush_setting_from_cname(cname.encode("ascii"))
            if sid < 0:
                raise ValueError(f"unknown libmypaint brush setting {cname!r}")
            self._settings[cname] = sid
        return sid

    def set_base_value(self, cname: str, value: float) -> None:
        """Set a setting's base value (kept across :meth:`reload`)."""
        sid = self.setting_id(cname)
        value = float(value)
        self._base_values[sid] = value
        self._lib.brush_set_base_value(self.handle, sid, value)

    def get_base_value(self, cname: str) -> float:
        return float(self._lib.brush_get_base_value(self.handle, self.setting_id(cname)))

    def reset(self) -> None:
        """Request a reset of the brush state (position, speed, smoothing) at the next stroke_to."""
        self._lib.brush_reset(self.handle)

    def new_stroke(self) -> None:
        """Start a new stroke (resets the stroke time inputs)."""
        self._lib.brush_new_stroke(self.handle)

    def stroke_to(self, surface: FixedSurface, x: float, y: float, pressure: float, dtime: float,
                  xtilt: float = 0.0, ytilt: float = 0.0) -> None:
        """Move the pen to ``(x, y)`` over ``dtime`` seconds, drawing on ``surface``."""
        self.stroke_to_fn(self.handle, surface.handle, x, y, pressure, xtilt, ytilt, dtime)

    def close(self) -> None:
        if self.handle:
            self._lib.brush_unref(self.handle)
            self.handle = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def load_brush_text(brushes_dir: str | os.PathLike[str], brush_type: str) -> str:
    """Text of ``<brushes_dir>/<brush_type>.myb``; a clear error names the file and package."""
    path = Path(brushes_dir) / f"{brush_type}.myb"
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"brush file {path} not found (env.paint.brush_type={brush_type!r}, "
                                f"env.paint.brushes_dir={str(brushes_dir)!r}); install the Debian package "
                                "mypaint-brushes") from None


def fix15_to_uint8(pixels: np.ndarray, channels: int = 3) -> np.ndarray:
    """``[..., 4]`` premultiplied fix15 RGBA to ``[..., channels]`` uint8 straight colour.

    As libmypaint's ``fix15_to_rgba8``: un-premultiply with rounding (``(c << 15 + a/2) / a``,
    0 where alpha is 0), then ``(255 * c + 2^14) >> 15``. When every pixel is opaque (painting
    on white paper) un-premultiplying is the identity and is skipped.
    """
    rgb = pixels[..., :channels].astype(np.uint32)
    alpha = pixels[..., 3:4].astype(np.uint32)
    if not np.all(alpha == FIX15_ONE):
        safe = np.maximum(alpha, 1)
        rgb = np.where(alpha == 0, 0, ((rgb << 15) + safe // 2) // safe)
    rgb *= 255
    rgb += FIX15_ONE // 2
    rgb >>= 15
    return rgb.astype(np.uint8)
