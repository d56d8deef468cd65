"""SynthNight scene model: a procedural perspective street, its labels and its depth.

Geometry
--------
A pinhole camera at height ``h_c`` (metres) above a flat ground plane looks horizontally along a
straight street; ``f`` is the focal length in pixels and ``(c_x, c_y)`` the principal point,
which is also the vanishing point of the street (``c_y`` is the horizon row). World axes: ``X``
to the right, ``Y`` up (height above the ground), ``Z`` forward (depth along the optical axis).
A pixel centre ``(x, y)`` and a depth ``Z`` give the world point

    X = (x - c_x) Z / f,        Y = h_c - (y - c_y) Z / f.

Every surface is an analytic primitive, and the rasteriser keeps the nearest one per pixel
(a z-buffer over ``Z``):

* ground plane (rows below the horizon): ``Z = f h_c / (y - c_y)``. The lateral position ``X``
  selects road (with dashed/solid lane markings and an optional zebra crossing), curb and sidewalk
  (both labelled sidewalk), a terrain verge, front yards and what lies beyond the building line;
* facade rows: vertical planes ``X = const`` on each side, cut along ``Z`` into blocks (buildings
  with windows and shopfronts, walls, fences, hedges, or open). A column ``x`` meets the plane at
  ``Z = f X / (x - c_x)``. Three rows per side: a low property-line row, the building row, and a
  distant skyline row seen through the gaps;
* billboards: camera-facing objects at a single depth ``Z`` (poles, street lamps, traffic lights and
  signs, trees, persons, riders on bicycles and motorcycles, parked bicycles, cars, buses, trucks,
  trams), built from a few world-sized shapes (rectangles, ellipses, rings, triangles, trapezoids,
  noisy blobs), so their image size falls off as ``1/Z``;
* sky everywhere else (``Z = inf``).

Randomness
----------
:func:`sample_layout` draws the static street (camera, road, facades, poles, trees, signs) from one
generator and the dynamic objects (people and vehicles) from another, so a day reference can show
the same place with other traffic, as Dark Zurich's GPS-matched pairs do. Textures are crops of a
few precomputed tileable value-noise tiles (:func:`noise_tiles`), indexed by world coordinates so
that they stick to the surfaces when the camera moves.

Outputs (:class:`SceneRaster`): the train-ID label map, depth ``Z`` in metres (``inf`` for sky), a
linear albedo (for the sky: its day radiance), a surface-orientation code, and the night emitters
(street-lamp heads, window pixels with a per-window random number, vehicle and traffic-light
lamps). :func:`depth_to_png` turns depth into a Depth-Anything-style 8-bit disparity map.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from udaseg.data.classes import CITYSCAPES_CLASSES

_ID = {name: i for i, name in enumerate(CITYSCAPES_CLASSES)}
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE = (
    _ID[n] for n in ("road", "sidewalk", "building", "wall", "fence", "pole")
)
TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY = (
    _ID[n] for n in ("traffic light", "traffic sign", "vegetation", "terrain", "sky")
)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = (
    _ID[n] for n in ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
)

# Surface orientation codes and their outward unit normals (world X, Y, Z).
N_SKY, N_GROUND, N_LEFT, N_RIGHT, N_FRONT = range(5)
NORMALS = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, -1]], dtype=np.float32)

# Facade block kinds.
OPEN, BLOCK_BUILDING, BLOCK_WALL, BLOCK_FENCE, BLOCK_HEDGE = range(5)
_KIND_LABEL = np.array([SKY, BUILDING, WALL, FENCE, VEGETATION], dtype=np.uint8)
# Texture amplitude per kind (on the "surface" noise tile).
_KIND_AMP = np.array([0.0, 0.14, 0.16, 0.15, 0.45], np.float32)

# Billboard shapes.
RECT, ELLIPSE, RING, TRI_UP, TRI_DOWN, TRAP, BLOB, FACADE = range(8)

TILE = 256
FBM, COARSE, FINE, SURFACE = range(4)  # noise tiles
Z_NEAR = 0.5
Z_FAR = 2000.0


def srgb_to_linear(c) -> np.ndarray:
    """Approximate sRGB EOTF (``c^2.2``) for colours given in display space."""
    return np.power(np.clip(np.asarray(c, dtype=np.float32), 0.0, 1.0), 2.2)


@functools.lru_cache(maxsize=1)
def noise_tiles() -> np.ndarray:
    """Four tileable noise tiles, shape (4, TILE, TILE), zero mean and unit std (float32).

    FBM: fractal value noise (5 octaves, object textures and clouds); COARSE: low-frequency value
    noise (cloud cover, tree-crown rims, hedge tops); FINE: high-frequency value noise (foliage);
    SURFACE: 7 octaves from stains to grain (one lookup textures a facade or the ground). Fixed
    seed: the tiles belong to the generator version, not to the user seed.
    """
    rng = np.random.default_rng(np.random.SeedSequence(20240917))

    def value_noise(grid: int) -> np.ndarray:
        vals = rng.standard_normal((grid, grid)).astype(np.float32)
        p = np.arange(TILE, dtype=np.float32) * grid / TILE
        i0 = np.floor(p).astype(np.int64)
        w = p - i0
        w = w * w * (3 - 2 * w)  # smoothstep
        i0 %= grid
        i1 = (i0 + 1) % grid
        rows = vals[i0] * (1 - w)[:, None] + vals[i1] * w[:, None]
        return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - a.mean()) / a.std()).astype(np.float32)

    fbm = sum(
        a * value_noise(g) for g, a in ((8, 1.0), (16, 0.6), (32, 0.4), (64, 0.25), (128, 0.18))
    )
    coarse = value_noise(4) + 0.5 * value_noise(8) + 0.25 * value_noise(16)
    fine = value_noise(64) + 0.7 * value_noise(128)
    octaves = ((2, 1.2), (4, 0.9), (8, 0.8), (16, 0.6), (32, 0.45), (64, 0.3), (128, 0.2))
    surface = sum(a * value_noise(g) for g, a in octaves)
    return np.stack([norm(fbm), norm(coarse), norm(fine), norm(surface)])


def _tex(tile: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Look up noise tile ``tile`` at texel coordinates (u, v) (wrapping; TILE is a power of 2)."""
    flat = noise_tiles()[tile].reshape(-1)
    return np.take(
        flat, (v.astype(np.int32) & (TILE - 1)) * TILE + (u.astype(np.int32) & (TILE - 1))
    )


def frac(x):
    """Fractional part ``x - floor(x)`` (much faster than ``np.mod(x, 1)``)."""
    return x - np.floor(x)


# ----------------------------------------------------------------------------- layout types


@dataclass(frozen=True)
class Camera:
    """Pinhole camera looking horizontally along the street."""

    width: int
    height: int
    focal: float
    """Focal length in pixels."""
    cx: float
    """Principal point x = vanishing point of the street (pixels)."""
    cy: float
    """Principal point y = horizon row (pixels)."""
    elevation: float
    """Camera height above the ground (metres)."""

    def moved(self, shift_x: float, shift_y: float, zoom: float) -> Camera:
        """This camera with the image shifted by (shift_x, shift_y) px and scaled by ``zoom``."""
        return replace(self, focal=self.focal * zoom, cx=self.cx + shift_x, cy=self.cy + shift_y)


class Prim(NamedTuple):
    """One shape of a billboard, in world metres (x: lateral X, y: height Y above the ground)."""

    shape: int
    x0: float
    x1: float
    y0: float
    y1: float
    label: int
    rgb: tuple[float, float, float]
    """Linear albedo."""
    tex: float = 0.1
    """Texture amplitude."""
    emit: tuple[float, float, float] | None = None
    """Night emission (linear radiance) or None."""
    param: float = 0.0
    """Shape parameter: inner radius (RING), top width fraction (TRAP), window pitch (FACADE)."""
    lamp: bool = False
    """A street-lamp head (its emission colour and power come from the night style)."""


class Billboard(NamedTuple):
    """A camera-facing object at depth ``z`` made of shapes drawn in order."""

    z: float
    prims: tuple[Prim, ...]


class Lamp(NamedTuple):
    """A street-lamp light source at world position (x, y, z)."""

    x: float
    y: float
    z: float


@dataclass(frozen=True, eq=False)
class FacadeRow:
    """Vertical plane ``X = side * offset``, cut along Z into blocks [z_edges[i], z_edges[i+1])."""

    side: int
    """-1 left, +1 right."""
    offset: float
    """Distance of the plane from the camera axis (metres, > 0)."""
    z_edges: np.ndarray
    """(n + 1,) block boundaries along Z (metres)."""
    kind: np.ndarray
    """(n,) block kind: OPEN, BLOCK_BUILDING, BLOCK_WALL, BLOCK_FENCE or BLOCK_HEDGE."""
    height: np.ndarray
    """(n,) block height (metres)."""
    colour: np.ndarray
    """(n, 3) linear albedo per block."""
    window_pitch: np.ndarray
    """(n, 2) window pitch (along the street, floor height) in metres; 0 = no windows."""
    window_size: np.ndarray
    """(n, 2) window size as a fraction of the pitch."""
    shopfront: np.ndarray
    """(n,) ground floor has shop windows."""
    tex_offset: float
    """Texture offset (texels) so that rows do not share a texture."""


@dataclass(frozen=True, eq=False)
class Street:
    """Ground plane layout. Lateral distances are measured outwards from the road edges."""

    road: tuple[float, float]
    """X of the left and right road edges."""
    dashed_lines: tuple[float, ...]
    solid_lines: tuple[float, ...]
    dash_period: float
    dash_phase: float
    sidewalk: tuple[float, float]
    """Sidewalk width per side (including the 0.2 m curb)."""
    verge: tuple[float, float]
    """Terrain strip width after the sidewalk, per side."""
    building_line: tuple[float, float]
    """Distance from the road edge to the building facades, per side."""
    beyond: tuple[int, int]
    """Label of the ground beyond the building line (seen through gaps): TERRAIN or SIDEWALK."""
    crosswalk: tuple[float, float] | None
    colours: np.ndarray
    """(5, 3) linear albedo of road, curb, sidewalk, terrain, marking."""
    tex_offset: float
    two_way: bool


@dataclass(frozen=True, eq=False)
class SceneLayout:
    """Everything needed to rasterise one scene from any camera."""

    camera: Camera
    street: Street
    facades: tuple[FacadeRow, ...]
    sky_top: np.ndarray
    sky_horizon: np.ndarray
    cloudiness: float
    static: tuple[Billboard, ...]
    dynamic: tuple[Billboard, ...]
    lamps: tuple[Lamp, ...]


@dataclass(eq=False)
class SceneRaster:
    """Per-pixel scene buffers for one camera (H x W)."""

    camera: Camera
    label: np.ndarray
    """(H, W) uint8 train IDs."""
    depth: np.ndarray
    """(H, W) float32 depth Z in metres, inf for sky."""
    albedo: np.ndarray
    """(3, H, W) float32 linear albedo (channel planes); for sky pixels the day sky radiance."""
    normal: np.ndarray
    """(H, W) uint8 orientation code (N_*)."""
    window: np.ndarray
    """(H, W) float32 per-window random number in [0, 1) on window glass, -1 elsewhere."""
    emission: np.ndarray
    """(3, H, W) float32 night emission of vehicle and traffic lights."""
    lamp_head: np.ndarray
    """(H, W) bool street-lamp heads."""
    lamps: tuple[Lamp, ...]


# ----------------------------------------------------------------------------- sampling

_BUILDING_COLOURS = np.array(
    [
        [0.80, 0.72, 0.60], [0.62, 0.36, 0.28], [0.56, 0.56, 0.56], [0.86, 0.85, 0.80],
        [0.86, 0.76, 0.52], [0.38, 0.38, 0.40], [0.80, 0.62, 0.58], [0.52, 0.58, 0.64],
        [0.70, 0.66, 0.58], [0.74, 0.52, 0.40],
    ]
)  # fmt: skip
_VEHICLE_COLOURS = np.array(
    [
        [0.90, 0.90, 0.90], [0.08, 0.08, 0.09], [0.62, 0.63, 0.66], [0.70, 0.10, 0.10],
        [0.12, 0.22, 0.55], [0.30, 0.32, 0.34], [0.85, 0.85, 0.80], [0.20, 0.40, 0.25],
        [0.75, 0.55, 0.15],
    ]
)  # fmt: skip
_CLOTHES = np.array(
    [
        [0.10, 0.10, 0.12], [0.20, 0.25, 0.45], [0.55, 0.10, 0.12], [0.75, 0.75, 0.72],
        [0.35, 0.30, 0.25], [0.15, 0.35, 0.20], [0.85, 0.70, 0.20], [0.40, 0.40, 0.42],
        [0.60, 0.45, 0.65],
    ]
)  # fmt: skip
_SKIN = np.array([[0.92, 0.76, 0.65], [0.80, 0.60, 0.47], [0.55, 0.38, 0.28], [0.36, 0.24, 0.18]])


@functools.cache
def _lin(r: float, g: float, b: float) -> tuple[float, float, float]:
    """Linear albedo of a display colour (cached: used for constant colours)."""
    return (r**2.2, g**2.2, b**2.2)


def _jitter(rng: np.random.Generator, c, amount: float = 0.05) -> tuple[float, float, float]:
    """Display colour ``c`` jittered by ±amount per channel, as a linear albedo triple."""
    j = rng.uniform(-amount, amount, 3).tolist()
    return tuple(min(max(float(ci) + ji, 0.0), 1.0) ** 2.2 for ci, ji in zip(c, j, strict=True))


def _pick(rng: np.random.Generator, table: np.ndarray, amount: float = 0.05):
    return _jitter(rng, table[rng.integers(len(table))], amount)


def sample_camera(rng: np.random.Generator, width: int, height: int) -> Camera:
    return Camera(
        width=width,
        height=height,
        focal=float(width * rng.uniform(0.8, 1.1)),
        cx=float(width * rng.uniform(0.38, 0.62)),
        cy=float(height * rng.uniform(0.36, 0.48)),
        elevation=float(rng.uniform(1.25, 1.7)),
    )


def sample_street(rng: np.random.Generator) -> Street:
    n_lanes = int(rng.integers(2, 5))
    lane_w = rng.uniform(2.9, 3.6)
    parking = (rng.random() < 0.5) * 2.2, (rng.random() < 0.6) * 2.2
    # The camera drives in the rightmost lane (or the one next to it on wide roads).
    cam_lane = n_lanes - 1 - int(n_lanes >= 3 and rng.random() < 0.4)
    right = (n_lanes - cam_lane - 0.5) * lane_w + parking[1] + rng.uniform(-0.4, 0.4)
    left = right - n_lanes * lane_w - parking[0] - parking[1]
    lane_x = [left + parking[0] + i * lane_w for i in range(n_lanes + 1)]
    two_way = n_lanes >= 2 and rng.random() < 0.7
    dashed = [
        x
        for i, x in enumerate(lane_x[1:-1], start=1)
        if not (two_way and i == n_lanes // 2 and rng.random() < 0.5)
    ]
    solid = [lane_x[0] + 0.15, lane_x[-1] - 0.15] + [x for x in lane_x[1:-1] if x not in dashed]
    sidewalk = (rng.uniform(1.8, 4.5), rng.uniform(1.8, 4.5))
    verge = tuple(float(rng.uniform(1.0, 3.0) if rng.random() < 0.35 else 0.0) for _ in range(2))
    building_line = tuple(
        float(sidewalk[i] + verge[i] + (rng.uniform(2.0, 6.0) if rng.random() < 0.3 else 0.0))
        for i in range(2)
    )
    crosswalk = None
    if rng.random() < 0.35:
        z0 = rng.uniform(8.0, 30.0)
        crosswalk = (float(z0), float(z0 + rng.uniform(3.0, 4.5)))
    g = rng.uniform(0.30, 0.42)
    colours = np.stack(
        [
            srgb_to_linear([g, g, g + rng.uniform(-0.01, 0.03)]),
            _jitter(rng, [0.72, 0.71, 0.68], 0.04),
            _pick(
                rng, np.array([[0.62, 0.60, 0.58], [0.66, 0.55, 0.50], [0.55, 0.55, 0.56]]), 0.04
            ),
            _pick(
                rng, np.array([[0.48, 0.56, 0.32], [0.55, 0.58, 0.38], [0.52, 0.45, 0.34]]), 0.04
            ),
            _jitter(rng, [0.88, 0.88, 0.86], 0.03),
        ]
    ).astype(np.float32)
    return Street(
        road=(float(left), float(right)),
        dashed_lines=tuple(float(x) for x in dashed),
        solid_lines=tuple(float(x) for x in solid),
        dash_period=float(rng.uniform(8.0, 12.0)),
        dash_phase=float(rng.uniform(0, 12.0)),
        sidewalk=tuple(float(s) for s in sidewalk),
        verge=verge,
        building_line=building_line,
        beyond=tuple(int(TERRAIN if rng.random() < 0.5 else SIDEWALK) for _ in range(2)),
        crosswalk=crosswalk,
        colours=colours,
        tex_offset=float(rng.uniform(0, TILE)),
        two_way=bool(two_way),
    )


_KIND_PALETTES = {
    BLOCK_BUILDING: (_BUILDING_COLOURS, 0.06),
    BLOCK_WALL: (np.array([[0.60, 0.60, 0.58], [0.68, 0.66, 0.60], [0.55, 0.40, 0.33]]), 0.05),
    BLOCK_FENCE: (np.array([[0.18, 0.30, 0.22], [0.50, 0.50, 0.52], [0.55, 0.42, 0.28]]), 0.05),
    BLOCK_HEDGE: (np.array([[0.22, 0.40, 0.16]]), 0.05),
    OPEN: (np.array([[0.0, 0.0, 0.0]]), 0.0),
}


def _facade_row(
    rng: np.random.Generator,
    side: int,
    offset: float,
    kinds: tuple[int, ...],
    probs: tuple[float, ...],
    length: dict[int, tuple[float, float]],
    height: dict[int, tuple[float, float]],
    colour_scale: float = 1.0,
) -> FacadeRow:
    """Cut the plane into blocks from Z_NEAR to at least 400 m (all draws vectorised)."""
    len_table = np.array([length.get(i, (1.0, 1.0)) for i in range(5)])
    n = (
        int(np.ceil(400.0 / len_table[list(kinds), 0].min())) + 1
    )  # enough blocks even if all are short
    k = rng.choice(np.asarray(kinds), size=n, p=probs)
    h_table = np.array([height.get(i, (0.0, 0.0)) for i in range(5)])
    edges = Z_NEAR + np.concatenate(
        [[0.0], np.cumsum(rng.uniform(len_table[k, 0], len_table[k, 1]))]
    )
    m = int(np.searchsorted(edges, 400.0)) + 1  # blocks kept
    k, edges = k[:m], edges[: m + 1]
    h = rng.uniform(h_table[k, 0], h_table[k, 1])
    choice = rng.random(m)
    jitter = rng.uniform(-1.0, 1.0, (m, 3))
    colour = np.zeros((m, 3))
    for kind, (palette, amount) in _KIND_PALETTES.items():
        sel = k == kind
        colour[sel] = palette[(choice[sel] * len(palette)).astype(int)] + amount * jitter[sel]
    colour = srgb_to_linear(colour) * colour_scale
    windows = (k == BLOCK_BUILDING)[:, None]
    pitch = np.where(windows, rng.uniform((1.8, 2.9), (3.5, 3.6), (m, 2)), 0.0)
    size = np.where(windows, rng.uniform((0.35, 0.4), (0.65, 0.6), (m, 2)), 0.0)
    return FacadeRow(
        side=side,
        offset=float(offset),
        z_edges=edges.astype(np.float32),
        kind=k.astype(np.int64),
        height=np.where(k == OPEN, 0.0, h).astype(np.float32),
        colour=colour.astype(np.float32),
        window_pitch=pitch.astype(np.float32),
        window_size=size.astype(np.float32),
        shopfront=windows[:, 0] & (rng.random(m) < 0.4),
        tex_offset=float(rng.uniform(0, TILE)),
    )


def _edge_x(street: Street, side: int) -> float:
    return street.road[0] if side < 0 else street.road[1]


def sample_facades(rng: np.random.Generator, street: Street) -> tuple[FacadeRow, ...]:
    rows = []
    for i, side in enumerate((-1, 1)):
        edge = abs(_edge_x(street, side))
        prop = edge + street.sidewalk[i] + street.verge[i]
        line = edge + street.building_line[i]
        if (
            street.building_line[i] > street.sidewalk[i] + street.verge[i] + 0.5
            or rng.random() < 0.5
        ):
            rows.append(
                _facade_row(
                    rng,
                    side,
                    prop,
                    (OPEN, BLOCK_WALL, BLOCK_FENCE, BLOCK_HEDGE),
                    (0.45, 0.2, 0.2, 0.15),
                    {k: (5.0, 30.0) for k in range(5)},
                    {BLOCK_WALL: (0.8, 2.4), BLOCK_FENCE: (1.0, 2.0), BLOCK_HEDGE: (0.8, 1.8)},
                )
            )
        rows.append(
            _facade_row(
                rng,
                side,
                line,
                (BLOCK_BUILDING, OPEN, BLOCK_HEDGE, BLOCK_WALL),
                (0.76, 0.1, 0.07, 0.07),
                {
                    BLOCK_BUILDING: (8.0, 35.0),
                    OPEN: (4.0, 15.0),
                    BLOCK_HEDGE: (4.0, 12.0),
                    BLOCK_WALL: (4.0, 12.0),
                },
                {BLOCK_BUILDING: (7.0, 28.0), BLOCK_HEDGE: (1.5, 4.0), BLOCK_WALL: (1.5, 3.5)},
            )
        )
        rows.append(
            _facade_row(
                rng,
                side,
                line + rng.uniform(15.0, 40.0),
                (BLOCK_BUILDING, OPEN),
                (0.85, 0.15),
                {BLOCK_BUILDING: (15.0, 50.0), OPEN: (5.0, 20.0)},
                {BLOCK_BUILDING: (12.0, 40.0)},
                colour_scale=0.85,
            )
        )
    return tuple(rows)


def _pole(x: float, h: float, w: float, rgb) -> Prim:
    return Prim(RECT, x - w / 2, x + w / 2, 0.0, h, POLE, rgb, 0.08)


_LAMP_GLASS = _lin(0.85, 0.85, 0.8)


def _street_lamp(rng, x: float, z: float, side: int, pole_rgb) -> tuple[Billboard, Lamp]:
    h = rng.uniform(6.5, 9.0)
    arm = rng.uniform(1.2, 2.5) * -side  # towards the road
    head_x = x + arm
    prims = (
        _pole(x, h, 0.18, pole_rgb),
        Prim(RECT, min(x, head_x), max(x, head_x), h - 0.12, h, POLE, pole_rgb, 0.05),
        Prim(ELLIPSE, head_x - 0.4, head_x + 0.4, h - 0.35, h + 0.05, POLE, pole_rgb, 0.05),
        Prim(
            ELLIPSE,
            head_x - 0.3,
            head_x + 0.3,
            h - 0.33,
            h - 0.18,
            POLE,
            _LAMP_GLASS,
            0.0,
            lamp=True,
        ),
    )
    return Billboard(float(z), prims), Lamp(float(head_x), float(h - 0.4), float(z))


def _traffic_light(rng, x: float, z: float, side: int, pole_rgb, overhead: bool) -> Billboard:
    state = int(rng.integers(3))  # 0 red, 1 yellow, 2 green
    on = [(4.0, 0.25, 0.12), (4.0, 2.2, 0.2), (0.3, 3.5, 1.6)][state]
    day_on = [(0.95, 0.1, 0.05), (0.95, 0.7, 0.05), (0.1, 0.9, 0.4)][state]
    if overhead:
        h = rng.uniform(5.5, 6.5)
        arm = rng.uniform(3.0, 5.5) * -side
        bx = x + arm
        prims = [
            _pole(x, h, 0.22, pole_rgb),
            Prim(RECT, min(x, bx), max(x, bx), h - 0.15, h, POLE, pole_rgb, 0.05),
        ]
        box_y = h - 1.1
    else:
        h = rng.uniform(3.0, 4.0)
        bx = x
        prims = [_pole(x, h, 0.14, pole_rgb)]
        box_y = h - 0.95
    box_rgb = _lin(*((0.12, 0.12, 0.12) if rng.random() < 0.7 else (0.75, 0.65, 0.15)))
    prims.append(
        Prim(RECT, bx - 0.18, bx + 0.18, box_y, box_y + 0.95, TRAFFIC_LIGHT, box_rgb, 0.05)
    )
    for i in range(3):
        cy = box_y + 0.8 - i * 0.3
        lit = i == state
        rgb = _lin(*(day_on if lit else [0.05, 0.05, 0.05]))
        prims.append(
            Prim(
                ELLIPSE,
                bx - 0.11,
                bx + 0.11,
                cy - 0.11,
                cy + 0.11,
                TRAFFIC_LIGHT,
                rgb,
                0.0,
                on if lit else None,
            )
        )
    return Billboard(float(z), tuple(prims))


def _traffic_sign(rng, x: float, z: float, pole_rgb) -> Billboard:
    h = rng.uniform(2.2, 3.2)
    s = rng.uniform(0.55, 0.85)
    y0 = h - s
    kind = int(rng.integers(4))
    white = _lin(0.92, 0.92, 0.9)
    red = _lin(0.8, 0.08, 0.1)
    blue = _lin(0.1, 0.3, 0.7)
    prims = [_pole(x, y0 + 0.1, 0.08, pole_rgb)]
    if kind == 0:  # round prohibition
        prims += [
            Prim(ELLIPSE, x - s / 2, x + s / 2, y0, h, TRAFFIC_SIGN, red, 0.03),
            Prim(ELLIPSE, x - s / 3, x + s / 3, y0 + s / 6, h - s / 6, TRAFFIC_SIGN, white, 0.03),
        ]
    elif kind == 1:  # warning triangle
        prims += [
            Prim(TRI_UP, x - s / 2, x + s / 2, y0, h, TRAFFIC_SIGN, red, 0.03),
            Prim(TRI_UP, x - s / 3, x + s / 3, y0 + s / 9, h - s / 4, TRAFFIC_SIGN, white, 0.03),
        ]
    elif kind == 2:  # blue information square
        prims += [
            Prim(RECT, x - s / 2, x + s / 2, y0, h, TRAFFIC_SIGN, blue, 0.03),
            Prim(RECT, x - s / 8, x + s / 8, y0 + s / 5, h - s / 5, TRAFFIC_SIGN, white, 0.03),
        ]
    else:  # give way (inverted triangle)
        prims += [
            Prim(TRI_DOWN, x - s / 2, x + s / 2, y0, h, TRAFFIC_SIGN, red, 0.03),
            Prim(TRI_DOWN, x - s / 3, x + s / 3, y0 + s / 4, h - s / 9, TRAFFIC_SIGN, white, 0.03),
        ]
    return Billboard(float(z), tuple(prims))


def _tree(rng, x: float, z: float) -> Billboard:
    trunk_h = rng.uniform(1.8, 3.2)
    crown_w = rng.uniform(2.5, 6.0)
    crown_h = crown_w * rng.uniform(0.9, 1.6)
    trunk = _jitter(rng, [0.30, 0.24, 0.18], 0.04)
    leaves = _jitter(rng, [0.25, 0.42, 0.15], 0.06)
    return Billboard(
        float(z),
        (
            Prim(RECT, x - 0.14, x + 0.14, 0.0, trunk_h + 0.5, VEGETATION, trunk, 0.15),
            Prim(
                BLOB,
                x - crown_w / 2,
                x + crown_w / 2,
                trunk_h,
                trunk_h + crown_h,
                VEGETATION,
                leaves,
                0.45,
            ),
        ),
    )


def sample_static(
    rng: np.random.Generator, street: Street
) -> tuple[tuple[Billboard, ...], tuple[Lamp, ...]]:
    """Street furniture: lamps, traffic lights, signs, bare poles and trees."""
    objs: list[Billboard] = []
    lamps: list[Lamp] = []
    pole_rgb = _pick(rng, np.array([[0.35, 0.35, 0.36], [0.5, 0.5, 0.5], [0.22, 0.26, 0.24]]), 0.04)
    spacing = rng.uniform(18.0, 32.0)
    lamp_sides = [(-1,), (1,), (-1, 1)][int(rng.integers(3))]
    for side in lamp_sides:
        x = _edge_x(street, side) + side * rng.uniform(0.4, 0.8)
        z = rng.uniform(4.0, spacing)
        while z < 110.0:
            b, lamp = _street_lamp(rng, x, z, side, pole_rgb)
            objs.append(b)
            lamps.append(lamp)
            z += spacing * rng.uniform(0.9, 1.1)
    if rng.random() < 0.65:  # intersection with traffic lights
        zi = rng.uniform(12.0, 60.0)
        for side in (-1, 1):
            x = _edge_x(street, side) + side * rng.uniform(0.5, 1.0)
            objs.append(
                _traffic_light(rng, x, zi + rng.uniform(-1, 1), side, pole_rgb, rng.random() < 0.4)
            )
    for _ in range(int(rng.integers(1, 5))):
        side = -1 if rng.random() < 0.5 else 1
        x = _edge_x(street, side) + side * rng.uniform(0.3, 1.0)
        objs.append(_traffic_sign(rng, x, rng.uniform(5.0, 70.0), pole_rgb))
    for _ in range(int(rng.integers(0, 4))):  # bare poles / bollards
        side = -1 if rng.random() < 0.5 else 1
        x = _edge_x(street, side) + side * rng.uniform(0.3, 1.2)
        h = rng.uniform(0.9, 4.5)
        objs.append(
            Billboard(
                float(rng.uniform(4.0, 60.0)), (_pole(x, h, rng.uniform(0.08, 0.2), pole_rgb),)
            )
        )
    for i, side in enumerate((-1, 1)):
        if rng.random() < 0.55:
            out = street.sidewalk[i] + (street.verge[i] / 2 if street.verge[i] > 0 else -0.6)
            x = _edge_x(street, side) + side * out
            z = rng.uniform(3.0, 12.0)
            tree_spacing = rng.uniform(7.0, 14.0)
            while z < 90.0:
                if rng.random() < 0.85:
                    objs.append(_tree(rng, x + rng.uniform(-0.2, 0.2), z))
                z += tree_spacing * rng.uniform(0.8, 1.2)
    return tuple(objs), tuple(lamps)


def _person(rng, x: float, z: float, label: int = PERSON) -> Billboard:
    h = rng.uniform(1.55, 1.95)
    s = h / 1.75
    top, trousers, skin = _pick(rng, _CLOTHES), _pick(rng, _CLOTHES), _pick(rng, _SKIN, 0.03)
    stride = rng.uniform(-0.08, 0.08) * s
    prims = (
        Prim(
            RECT, x - 0.16 * s + stride, x - 0.02 * s + stride, 0.0, 0.86 * s, label, trousers, 0.1
        ),
        Prim(
            RECT, x + 0.02 * s - stride, x + 0.16 * s - stride, 0.0, 0.86 * s, label, trousers, 0.1
        ),
        Prim(TRAP, x - 0.22 * s, x + 0.22 * s, 0.82 * s, 1.48 * s, label, top, 0.12, None, 1.15),
        Prim(RECT, x - 0.30 * s, x - 0.21 * s, 0.86 * s, 1.44 * s, label, top, 0.1),
        Prim(RECT, x + 0.21 * s, x + 0.30 * s, 0.86 * s, 1.44 * s, label, top, 0.1),
        Prim(ELLIPSE, x - 0.11 * s, x + 0.11 * s, 1.46 * s, 1.75 * s, label, skin, 0.05),
        Prim(
            ELLIPSE,
            x - 0.115 * s,
            x + 0.115 * s,
            1.62 * s,
            1.77 * s,
            label,
            _pick(rng, _CLOTHES[:5], 0.03),
            0.05,
        ),
    )
    return Billboard(float(z), prims)


def _bicycle_side(rng, x: float, direction: int, label: int, motor: bool) -> list[Prim]:
    frame = _pick(rng, _VEHICLE_COLOURS if motor else _CLOTHES)
    black = _lin(0.06, 0.06, 0.06)
    r = 0.36 if motor else 0.34
    gap = 0.72 if motor else 0.56
    prims = []
    for c in (x - gap, x + gap):
        if motor:
            prims.append(Prim(ELLIPSE, c - r, c + r, 0.0, 2 * r, label, black, 0.05))
        else:
            prims.append(Prim(RING, c - r, c + r, 0.0, 2 * r, label, black, 0.02, None, 0.82))
            prims.append(Prim(RECT, c - 0.03, c + 0.03, r - 0.03, r + 0.03, label, black, 0.0))
    if motor:
        prims.append(Prim(TRAP, x - 0.6, x + 0.55, 0.3, 0.85, label, frame, 0.1, None, 0.7))
        prims.append(
            Prim(
                RECT,
                x + direction * 0.55 - 0.05,
                x + direction * 0.55 + 0.05,
                0.4,
                1.1,
                label,
                black,
                0.0,
            )
        )
    else:
        prims.append(Prim(RECT, x - gap, x + gap * 0.7, 0.62, 0.67, label, frame, 0.0))
        prims.append(
            Prim(
                RECT,
                x - 0.22 * direction - 0.025,
                x - 0.22 * direction + 0.025,
                r,
                0.9,
                label,
                frame,
                0.0,
            )
        )
        hx = x + direction * gap * 0.85
        prims.append(Prim(RECT, hx - 0.025, hx + 0.025, r, 1.0, label, frame, 0.0))
        prims.append(Prim(RECT, x - gap, x + 0.0, r - 0.02, r + 0.03, label, frame, 0.0))
    return prims


def _rider(rng, x: float, z: float, motor: bool, side_view: bool) -> Billboard:
    vehicle = MOTORCYCLE if motor else BICYCLE
    top, trousers, skin = _pick(rng, _CLOTHES), _pick(rng, _CLOTHES), _pick(rng, _SKIN, 0.03)
    if side_view:
        d = 1 if rng.random() < 0.5 else -1
        prims = _bicycle_side(rng, x, d, vehicle, motor)
        sy = 0.85 if motor else 0.9
        prims += [
            Prim(RECT, x - 0.3, x + 0.0, sy - 0.45, sy + 0.05, RIDER, trousers, 0.1),
            Prim(TRAP, x - 0.28, x + 0.12, sy, sy + 0.62, RIDER, top, 0.12, None, 0.8),
            Prim(
                RECT,
                x + min(0, d) * 0.45 + 0.0,
                x + max(0, d) * 0.45,
                sy + 0.4,
                sy + 0.5,
                RIDER,
                top,
                0.1,
            ),
            Prim(
                ELLIPSE,
                x - 0.1 + d * 0.05,
                x + 0.14 + d * 0.05,
                sy + 0.58,
                sy + 0.86,
                RIDER,
                skin if not motor else _pick(rng, _CLOTHES[:4]),
                0.05,
            ),
        ]
        return Billboard(float(z), tuple(prims))
    # Rear view: a narrow wheel, the rider's back and handlebars.
    black = _lin(0.06, 0.06, 0.06)
    w = 0.12 if motor else 0.05
    prims = [
        Prim(RECT, x - w, x + w, 0.0, 0.72, vehicle, black, 0.05),
        Prim(RECT, x - 0.32, x + 0.32, 0.98, 1.04, vehicle, black, 0.0),
    ]
    if motor:
        prims.append(
            Prim(
                RECT,
                x - 0.2,
                x + 0.2,
                0.45,
                0.85,
                vehicle,
                _pick(rng, _VEHICLE_COLOURS),
                0.1,
                (1.2, 0.05, 0.02),
            )
        )
    prims += [
        Prim(RECT, x - 0.17, x - 0.03, 0.35, 1.0, RIDER, trousers, 0.1),
        Prim(RECT, x + 0.03, x + 0.17, 0.35, 1.0, RIDER, trousers, 0.1),
        Prim(TRAP, x - 0.22, x + 0.22, 0.95, 1.6, RIDER, top, 0.12, None, 1.1),
        Prim(
            ELLIPSE,
            x - 0.11,
            x + 0.11,
            1.58,
            1.86,
            RIDER,
            skin if not motor else _pick(rng, _CLOTHES[:4]),
            0.05,
        ),
    ]
    return Billboard(float(z), tuple(prims))


def _car(rng, x: float, z: float, front: bool) -> Billboard:
    w, h = rng.uniform(1.65, 1.9), rng.uniform(1.35, 1.6)
    body = _pick(rng, _VEHICLE_COLOURS)
    glass = _lin(0.12, 0.14, 0.17)
    black = _lin(0.05, 0.05, 0.05)
    belt = 0.6 * h
    lights_rgb = _lin(*([0.9, 0.9, 0.8] if front else [0.75, 0.05, 0.05]))
    lights_emit = (6.0, 5.6, 4.5) if front else (1.6, 0.05, 0.03)
    prims = (
        Prim(RECT, x - w / 2 + 0.05, x - w / 2 + 0.3, 0.0, 0.35, CAR, black, 0.05),
        Prim(RECT, x + w / 2 - 0.3, x + w / 2 - 0.05, 0.0, 0.35, CAR, black, 0.05),
        Prim(RECT, x - w / 2, x + w / 2, 0.2, belt, CAR, body, 0.06),
        Prim(TRAP, x - w * 0.45, x + w * 0.45, belt, h, CAR, body, 0.06, None, 0.72),
        Prim(TRAP, x - w * 0.38, x + w * 0.38, belt + 0.05, h - 0.07, CAR, glass, 0.03, None, 0.75),
        Prim(RECT, x - w / 2, x + w / 2, 0.2, 0.3, CAR, black, 0.05),
        Prim(RECT, x - 0.25, x + 0.25, 0.32, 0.44, CAR, _lin(0.9, 0.9, 0.88), 0.0),
        Prim(
            RECT,
            x - w / 2 + 0.05,
            x - w / 2 + 0.35,
            belt - 0.18,
            belt - 0.04,
            CAR,
            lights_rgb,
            0.0,
            lights_emit,
        ),
        Prim(
            RECT,
            x + w / 2 - 0.35,
            x + w / 2 - 0.05,
            belt - 0.18,
            belt - 0.04,
            CAR,
            lights_rgb,
            0.0,
            lights_emit,
        ),
    )
    return Billboard(float(z), prims)


def _big_vehicle(rng, x: float, z: float, label: int, front: bool) -> Billboard:
    black = _lin(0.05, 0.05, 0.05)
    glass = _lin(0.10, 0.12, 0.15)
    if label == BUS:
        w, h = 2.55, rng.uniform(3.0, 3.3)
        body = _pick(
            rng,
            np.array([[0.85, 0.15, 0.12], [0.9, 0.75, 0.1], [0.9, 0.9, 0.88], [0.15, 0.35, 0.7]]),
        )
    elif label == TRAIN:
        w, h = 2.4, rng.uniform(3.3, 3.6)
        body = _pick(rng, np.array([[0.15, 0.35, 0.7], [0.9, 0.9, 0.88], [0.2, 0.55, 0.3]]))
    else:
        w, h = 2.45, rng.uniform(3.0, 3.8)
        body = _pick(
            rng, np.array([[0.9, 0.9, 0.9], [0.5, 0.52, 0.55], [0.2, 0.3, 0.6], [0.6, 0.15, 0.1]])
        )
    lights_rgb = _lin(*([0.9, 0.9, 0.8] if front else [0.75, 0.05, 0.05]))
    lights_emit = (6.0, 5.6, 4.5) if front else (1.6, 0.05, 0.03)
    prims = [
        Prim(RECT, x - w / 2 + 0.1, x - w / 2 + 0.45, 0.0, 0.5, label, black, 0.05),
        Prim(RECT, x + w / 2 - 0.45, x + w / 2 - 0.1, 0.0, 0.5, label, black, 0.05),
        Prim(RECT, x - w / 2, x + w / 2, 0.3, h, label, body, 0.06),
    ]
    if label == TRUCK and not front:
        prims.append(Prim(RECT, x - 0.02, x + 0.02, 0.6, h - 0.1, label, black, 0.0))
    else:
        prims.append(
            Prim(RECT, x - w / 2 + 0.12, x + w / 2 - 0.12, h * 0.45, h - 0.3, label, glass, 0.03)
        )
    if label != TRUCK:
        prims.append(
            Prim(
                RECT,
                x - w / 2 + 0.25,
                x + w / 2 - 0.25,
                h - 0.28,
                h - 0.08,
                label,
                black,
                0.0,
                (1.5, 0.9, 0.2),
            )
        )
    if label == TRAIN:
        prims.append(Prim(RECT, x - 0.5, x + 0.5, h, h + 0.4, label, black, 0.0))
    prims += [
        Prim(
            RECT, x - w / 2 + 0.1, x - w / 2 + 0.4, 0.6, 0.85, label, lights_rgb, 0.0, lights_emit
        ),
        Prim(
            RECT, x + w / 2 - 0.4, x + w / 2 - 0.1, 0.6, 0.85, label, lights_rgb, 0.0, lights_emit
        ),
    ]
    return Billboard(float(z), tuple(prims))


def sample_dynamic(rng: np.random.Generator, street: Street) -> tuple[Billboard, ...]:
    """People and vehicles on the road and sidewalks (re-drawn for a day reference)."""
    left, right = street.road
    objs: list[Billboard] = []
    centre = 0.5 * (left + right)

    def on_sidewalk(side: int) -> float:
        i = 0 if side < 0 else 1
        return _edge_x(street, side) + side * rng.uniform(0.4, max(0.5, street.sidewalk[i] - 0.3))

    for _ in range(int(rng.integers(0, 9))):
        side = -1 if rng.random() < 0.5 else 1
        objs.append(_person(rng, on_sidewalk(side), rng.uniform(4.0, 60.0)))
    if street.crosswalk is not None and rng.random() < 0.6:
        for _ in range(int(rng.integers(1, 4))):
            objs.append(
                _person(rng, rng.uniform(left + 0.5, right - 0.5), rng.uniform(*street.crosswalk))
            )
    # Parked cars along the road edges, moving cars in the lanes.
    for side in (-1, 1):
        if rng.random() < 0.55:
            x = _edge_x(street, side) - side * rng.uniform(1.0, 1.3)
            z = rng.uniform(4.0, 15.0)
            while z < 70.0:
                if rng.random() < 0.75:
                    objs.append(_car(rng, x + rng.uniform(-0.1, 0.1), z, front=False))
                z += rng.uniform(4.8, 7.0)
    for _ in range(int(rng.integers(0, 5))):
        x = rng.uniform(left + 1.5, right - 1.5)
        objs.append(_car(rng, x, rng.uniform(7.0, 80.0), front=street.two_way and x < centre - 0.5))
    for label, p in ((BUS, 0.3), (TRUCK, 0.3), (TRAIN, 0.08)):
        if rng.random() < p:
            x = (
                centre + rng.uniform(-1.0, 1.0)
                if label == TRAIN
                else rng.uniform(left + 1.5, right - 1.5)
            )
            objs.append(
                _big_vehicle(
                    rng, x, rng.uniform(9.0, 60.0), label, street.two_way and x < centre - 0.5
                )
            )
    for _ in range(int(rng.integers(0, 3))):
        motor = rng.random() < 0.3
        side_view = rng.random() < 0.4
        x = rng.uniform(left + 0.8, right - 0.8) if side_view else right - rng.uniform(0.6, 1.5)
        objs.append(_rider(rng, x, rng.uniform(5.0, 45.0), motor, side_view))
    if rng.random() < 0.3:  # parked bicycles on the sidewalk
        side = -1 if rng.random() < 0.5 else 1
        x = on_sidewalk(side)
        b = _bicycle_side(rng, x, 1, BICYCLE, False)
        objs.append(Billboard(float(rng.uniform(4.0, 30.0)), tuple(b)))
    if rng.random() < 0.15:  # parked motorcycle
        b = _bicycle_side(rng, right - 0.8, 1, MOTORCYCLE, True)
        objs.append(Billboard(float(rng.uniform(5.0, 30.0)), tuple(b)))
    return tuple(objs)


def sample_layout(
    rng_static: np.random.Generator, rng_dynamic: np.random.Generator, width: int, height: int
) -> SceneLayout:
    """Draw a scene: camera and static street from ``rng_static``, traffic from ``rng_dynamic``."""
    camera = sample_camera(rng_static, width, height)
    street = sample_street(rng_static)
    facades = sample_facades(rng_static, street)
    static, lamps = sample_static(rng_static, street)
    if rng_static.random() < 0.35:  # the street ends at a facade across it
        z_end = rng_static.uniform(70.0, 200.0)
        xl = -facades[0].offset - 20.0
        xr = facades[-1].offset + 20.0
        h = rng_static.uniform(10.0, 30.0)
        col = _pick(rng_static, _BUILDING_COLOURS, 0.06)
        static = static + (
            Billboard(float(z_end), (Prim(FACADE, xl, xr, 0.0, h, BUILDING, col, 0.1, None, 3.0),)),
        )
    sky_top = srgb_to_linear(np.array([0.35, 0.55, 0.85]) + rng_static.uniform(-0.08, 0.08, 3))
    sky_horizon = srgb_to_linear(np.array([0.75, 0.82, 0.9]) + rng_static.uniform(-0.05, 0.05, 3))
    return SceneLayout(
        camera=camera,
        street=street,
        facades=facades,
        sky_top=sky_top,
        sky_horizon=sky_horizon,
        cloudiness=float(rng_static.uniform(0.0, 0.8)),
        static=static,
        dynamic=sample_dynamic(rng_dynamic, street),
        lamps=lamps,
    )


# ----------------------------------------------------------------------------- rasterisation


_GLASS = np.array([0.8, 0.9, 1.0], dtype=np.float32)


def _window_pattern(u, v, pitch_u, pitch_v, size_u, size_v, height, shop):
    """Window glass on a facade (u along the street, v height, metres; arrays broadcast).

    Windows sit on a grid of pitch (pitch_u, pitch_v) above the ground floor; shopfronts put wide
    windows on the ground floor. All pitches must be > 0. Returns the glass mask and an integer
    id per pixel that is the same on one window and differs between neighbouring windows.
    """
    qu = u / pitch_u
    cu = np.floor(qu)
    upper_u = np.abs(qu - cu - 0.5) < 0.5 * size_u
    shop_u = shop & (frac(0.5 * qu) < 0.8)
    qv = v / pitch_v
    cv = np.floor(qv)
    fv = qv - cv
    upper = upper_u & (fv > 0.3) & (fv < 0.3 + size_v) & (v > pitch_v) & (v < height - 0.8)
    mask = upper | (shop_u & (v > 0.4) & (v < 2.6))
    ids = cu.astype(np.int32) * 31 + cv.astype(np.int32) * 7
    return mask, ids


@functools.lru_cache(maxsize=1)
def _hash_table() -> np.ndarray:
    return np.random.default_rng(7).random(4096).astype(np.float32)


def _hash(ids: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per integer id (window lit flags, brightness)."""
    table = _hash_table()
    return table[ids & (len(table) - 1)]


def _raster_ground(r: SceneRaster, street: Street) -> None:
    cam = r.camera
    H, W = r.label.shape
    y0 = int(np.clip(np.floor(cam.cy + 0.5), 0, H))
    if y0 >= H:
        return
    yc = np.arange(y0, H, dtype=np.float32) + 0.5
    dy = np.maximum(yc - cam.cy, 1e-3)
    zg = np.minimum(cam.focal * cam.elevation / dy, Z_FAR)  # (h,)
    xc = np.arange(W, dtype=np.float32) + 0.5
    X = (xc - cam.cx)[None, :] * (zg[:, None] / cam.focal)  # (h, W)
    Z = np.broadcast_to(zg[:, None], X.shape)
    left, right = street.road
    is_right = X > 0.5 * (left + right)
    d = np.where(is_right, X - right, left - X)  # outward distance from the road edge (<0: on road)
    sidewalk = np.where(is_right, street.sidewalk[1], street.sidewalk[0])
    bline = np.where(is_right, street.building_line[1], street.building_line[0])
    beyond = np.where(is_right, street.beyond[1], street.beyond[0])
    # material: 0 road, 1 curb, 2 sidewalk, 3 terrain
    mat = np.full(X.shape, 2, dtype=np.int8)
    mat[d < 0] = 0
    mat[(d >= 0) & (d < 0.2)] = 1
    inner = (d >= sidewalk) & (d < bline)
    mat[inner] = 3  # verge strip and front yards
    far = d >= bline
    mat[far & (beyond == TERRAIN)] = 3
    to = street.tex_offset
    noise = _tex(SURFACE, X * 12 + to, Z * 12)
    mat[far & (beyond == SIDEWALK) & (noise > 1.3)] = 3  # terrain patches beyond the building line
    label_of = np.array([ROAD, SIDEWALK, SIDEWALK, TERRAIN], dtype=np.uint8)
    amp = np.array([0.16, 0.1, 0.15, 0.4], dtype=np.float32)
    tex = np.take(amp, mat) * noise
    # Sidewalk paving joints, faded with distance to avoid moire.
    near = (slice(0, int(np.searchsorted(-zg, -40.0))),)  # rows nearer than 40 m
    paving = mat[near] == 2
    joint = (frac(X[near] * 2.0) < 0.06) | (frac(Z[near] * 2.0) < 0.06)
    tex[near] -= (paving & joint) * (0.25 * np.exp(-zg[near] / 12.0))[:, None]
    albedo = np.take(street.colours.T, mat, axis=1) * np.clip(1.0 + tex, 0.2, 2.0)  # (3, h, W)
    # Lane markings: per row, a band of columns around each line, with coverage antialiasing.
    ppm = (dy / cam.elevation)[:, None]  # pixels per metre at each row (f / Z)
    half = 0.07 * ppm
    K = int(np.ceil(0.07 * float(ppm.max()) + 1.5))
    offs = np.arange(-K, K + 1)
    dash_on = (frac((zg + street.dash_phase) / street.dash_period) < 0.4)[:, None]
    rows_idx = np.broadcast_to(np.arange(len(zg))[:, None], (len(zg), len(offs)))
    for lines, dashed in ((street.solid_lines, False), (street.dashed_lines, True)):
        for lx in lines:
            xl = cam.cx + lx * ppm  # (h, 1) line centre in pixels
            cols = np.floor(xl).astype(np.int64) + offs
            c = np.clip(half + 0.5 - np.abs(cols + 0.5 - xl), 0.0, 1.0) * np.minimum(1.0, 2 * half)
            if dashed:
                c = c * dash_on
            ok = (cols >= 0) & (cols < W) & (c > 0)
            rr, cc, c = rows_idx[ok], cols[ok], c[ok].astype(np.float32)[:, None]
            albedo[:, rr, cc] += (street.colours[4][:, None] - albedo[:, rr, cc]) * c[:, 0]
    if street.crosswalk is not None:
        z0, z1 = street.crosswalk
        band = np.flatnonzero((zg > z0) & (zg < z1))
        if band.size:
            sub = (slice(band[0], band[-1] + 1),)
            zebra = (frac(X[sub]) < 0.5) & (d[sub] < -0.4)
            np.copyto(
                albedo[:, band[0] : band[-1] + 1], street.colours[4][:, None, None], where=zebra
            )
    r.label[y0:] = np.take(label_of, mat)
    r.depth[y0:] = Z
    r.albedo[:, y0:] = albedo
    r.normal[y0:] = N_GROUND


def _raster_facade(r: SceneRaster, row: FacadeRow, chunk: int = 48) -> None:
    """Z-test and shade one facade row on its side of the image.

    Per column the plane depth, block and covered rows are analytic; the pixels are shaded densely
    in chunks of ``chunk`` columns, each over the rows that its columns cover.
    """
    cam = r.camera
    H, W = r.label.shape
    if row.side < 0:
        c0, c1 = 0, int(np.clip(np.floor(cam.cx - 0.5), 0, W))
    else:
        c0, c1 = int(np.clip(np.ceil(cam.cx + 0.5), 0, W)), W
    if c1 <= c0:
        return
    cols = np.arange(c0, c1)
    zc = (cam.focal * row.offset / np.maximum(np.abs(cols + 0.5 - cam.cx), 1e-3)).astype(np.float32)
    idx = np.searchsorted(row.z_edges, zc, side="right") - 1
    valid = (idx >= 0) & (idx < len(row.kind)) & (zc > Z_NEAR)
    idx = np.clip(idx, 0, len(row.kind) - 1)
    keep = valid & (row.kind[idx] != OPEN)
    nz = np.flatnonzero(keep)
    if nz.size == 0:
        return
    ca, cb = int(nz[0]), int(nz[-1]) + 1
    zc, idx, keep = zc[ca:cb], idx[ca:cb], keep[ca:cb]
    c0 += ca
    kind = row.kind[idx]
    height = row.height[idx]
    hedge = kind == BLOCK_HEDGE
    if hedge.any():  # hedges get a bumpy top
        height = np.where(hedge, height + 0.35 * _tex(COARSE, zc * 4, np.zeros_like(zc)), height)
    # Covered rows per column: 0 <= v < height, v = h_c - (y - c_y) Z / f the height above ground.
    inv = zc / np.float32(cam.focal)
    y_top = np.clip(
        np.floor(cam.cy - (height - cam.elevation) / inv - 0.5).astype(np.int64) + 1, 0, H
    )
    y_bot = np.clip(np.floor(cam.cy + cam.elevation / inv - 0.5).astype(np.int64) + 1, 0, H)
    y_top, y_bot = np.where(keep, y_top, H), np.where(keep, y_bot, 0)
    # Per-column shading inputs.
    u = zc - row.z_edges[idx]  # along the facade, metres from the block start
    tu = (u * 10 + row.tex_offset).astype(np.int32) & (TILE - 1)
    amp = _KIND_AMP[kind]
    colour = row.colour[idx].T  # (3, n)
    bld = kind == BLOCK_BUILDING
    fence = kind == BLOCK_FENCE
    pitch, size = row.window_pitch[idx], row.window_size[idx]
    wcols = bld & (pitch[:, 0] > 0)
    pu, pv = np.where(wcols, pitch[:, 0], 1.0), np.where(wcols, pitch[:, 1], 1.0)
    shop = row.shopfront[idx] & wcols
    block = (idx * 131 + (row.side + 1) * 977 + int(row.offset * 10)).astype(np.int32)
    tile = noise_tiles()[SURFACE]
    normal_code = N_LEFT if row.side < 0 else N_RIGHT
    for a in range(0, len(zc), chunk):
        b = min(a + chunk, len(zc))
        r0, r1 = int(y_top[a:b].min()), int(y_bot[a:b].max())
        if r1 <= r0:
            continue
        sl = (slice(r0, r1), slice(c0 + a, c0 + b))
        h = height[a:b]
        yc = np.arange(r0, r1, dtype=np.float32) + np.float32(0.5 - cam.cy)
        v = cam.elevation - yc[:, None] * inv[a:b]
        mask = (v >= 0) & (v < h) & keep[a:b] & (r.depth[sl] > zc[a:b])
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            continue
        if rows.size < mask.shape[0]:  # mostly hidden (e.g. the skyline behind the buildings)
            ra, rb = int(rows[0]), int(rows[-1]) + 1
            sl, v, mask = (slice(r0 + ra, r0 + rb), sl[1]), v[ra:rb], mask[ra:rb]
        tex = amp[a:b] * np.take(tile, ((v * 10).astype(np.int32) & (TILE - 1)) * TILE + tu[a:b])
        if fence[a:b].any():  # vertical bars and rails
            bars = (frac(u[a:b] / 0.14) < 0.35) | (np.abs(v - h * 0.85) < 0.05) | (v < 0.15)
            tex += np.where(
                fence[a:b], np.where(bars, np.float32(0.35), np.float32(-0.45)), np.float32(0.0)
            )
        tex -= (bld[a:b] & (v > h - 0.5)) * np.float32(0.3)  # darker cornice
        np.clip(tex + np.float32(1.0), 0.15, 2.0, out=tex)
        alb = colour[:, None, a:b] * tex  # (3, rows, cols)
        window = np.float32(-1.0)
        if wcols[a:b].any():
            win, win_id = _window_pattern(
                u[a:b], v, pu[a:b], pv[a:b], size[a:b, 0], size[a:b, 1], h, shop[a:b]
            )
            win &= wcols[a:b]
            rnd = _hash(win_id + block[a:b])
            window = np.where(win, rnd, np.float32(-1.0))
            glass = np.float32(0.035) + np.float32(0.05) * rnd
            for c in range(3):
                np.copyto(alb[c], glass * _GLASS[c], where=win)
        np.copyto(r.window[sl], window, where=mask)
        np.copyto(r.label[sl], _KIND_LABEL[kind[a:b]], where=mask)
        np.copyto(r.depth[sl], zc[a:b], where=mask)
        np.copyto(r.albedo[(slice(None),) + sl], alb, where=mask)
        np.copyto(r.normal[sl], normal_code, where=mask, casting="unsafe")


def _draw_billboard(
    cam: Camera, depth: np.ndarray, pid: np.ndarray, b: Billboard, first_id: int
) -> None:
    """Z-test the shapes of ``b``; write their ids (first_id + i) and depth (shading deferred)."""
    H, W = depth.shape
    z = b.z
    if z <= Z_NEAR:
        return
    s = cam.focal / z
    if max(p.y1 for p in b.prims) * s < 3.0:  # under 3 pixels tall: not drawn (nor labelled)
        return
    xo, yo = cam.cx + 0.5, cam.cy + cam.elevation * s + 0.5
    for i, p in enumerate(b.prims):
        # Pixel bounds; thin rectangles stay at least one pixel wide.
        c0, c1 = math.floor(xo + p.x0 * s), math.floor(xo + p.x1 * s)
        r0, r1 = math.floor(yo - p.y1 * s), math.floor(yo - p.y0 * s)
        if p.shape == RECT:
            c1, r1 = max(c1, c0 + 1), max(r1, r0 + 1)
        c0, c1, r0, r1 = max(c0, 0), min(c1, W), max(r0, 0), min(r1, H)
        if c1 <= c0 or r1 <= r0:
            continue
        sl = (slice(r0, r1), slice(c0, c1))
        mask = depth[sl] > z
        if p.shape not in (RECT, FACADE):
            xw = (np.arange(c0, c1, dtype=np.float32) + 0.5 - cam.cx) / s
            yw = cam.elevation - (np.arange(r0, r1, dtype=np.float32) + 0.5 - cam.cy) / s
            u = (2.0 / (p.x1 - p.x0)) * (xw - p.x0) - 1.0  # -1..1 across
            v = ((yw - p.y0) / (p.y1 - p.y0))[:, None]  # 0 bottom .. 1 top
            if p.shape == ELLIPSE:
                mask &= u[None, :] ** 2 + (2 * v - 1) ** 2 <= 1.0
            elif p.shape == RING:
                e = u[None, :] ** 2 + (2 * v - 1) ** 2
                mask &= (e <= 1.0) & (e >= p.param**2)
            elif p.shape == TRI_UP:
                mask &= np.abs(u)[None, :] <= 1.0 - v
            elif p.shape == TRI_DOWN:
                mask &= np.abs(u)[None, :] <= v
            elif p.shape == TRAP:
                mask &= np.abs(u)[None, :] <= 1.0 - (1.0 - p.param) * v
            else:  # BLOB: ellipse with a noisy rim
                rim = _tex(COARSE, xw[None, :] * 6 + z * 7, yw[:, None] * 6)
                mask &= u[None, :] ** 2 + (2 * v - 1) ** 2 <= 0.85 + 0.25 * rim
        np.copyto(depth[sl], z, where=mask, casting="unsafe")
        np.copyto(pid[sl], first_id + i, where=mask, casting="unsafe")


_NO_EMIT = (0.0, 0.0, 0.0)


def _shade_billboards(r: SceneRaster, pid: np.ndarray, prims: list[tuple[float, Prim]]) -> None:
    """Fill label, albedo, emitters and windows of every pixel won by a billboard shape."""
    fi = np.flatnonzero(pid.reshape(-1) >= 0)
    if fi.size == 0:
        return
    cam = r.camera
    W = r.label.shape[1]
    q = pid.reshape(-1)[fi]
    # Per-shape table: z, shape, x0, y0, y1, tex, param, label, lamp, r, g, b, emit r, g, b.
    T = np.array(
        [
            (
                z,
                p.shape,
                p.x0,
                p.y0,
                p.y1,
                p.tex,
                p.param,
                p.label,
                p.lamp,
                *p.rgb,
                *(p.emit or _NO_EMIT),
            )
            for z, p in prims
        ],
        dtype=np.float32,
    )[q]
    zq, shape = T[:, 0], T[:, 1].astype(np.int8)
    y = fi // W
    xw = (fi - y * W + np.float32(0.5 - cam.cx)) * (zq / np.float32(cam.focal))
    yw = cam.elevation - (y + np.float32(0.5 - cam.cy)) * (zq / np.float32(cam.focal))
    blob = shape == BLOB
    tile = np.where(blob, FINE, FBM)
    tu = (xw * 20 + zq * 13).astype(np.int32) & (TILE - 1)
    tv = (yw * 20).astype(np.int32) & (TILE - 1)
    tex = T[:, 5] * np.take(noise_tiles(), (tile * TILE + tv) * TILE + tu)
    if blob.any():  # tree crowns are darker at the bottom
        tex -= blob * 0.25 * (1 - (yw - T[:, 3]) / (T[:, 4] - T[:, 3]))
    alb = T[:, 9:12].T * np.clip(1.0 + tex, 0.2, 2.0)  # (3, n)
    window = np.full(fi.shape, -1.0, dtype=np.float32)
    sel = np.flatnonzero(shape == FACADE)
    if sel.size:
        x0, top, pitch = T[sel, 2], T[sel, 4], T[sel, 6]
        win, win_id = _window_pattern(xw[sel] - x0, yw[sel], pitch, 3.2, 0.5, 0.5, top, False)
        sel, win_id = sel[win], win_id[win]
        rnd = _hash(win_id + (zq[sel] * 10).astype(np.int32))
        alb[:, sel] = np.float32(0.05) + 0.04 * rnd
        window[sel] = rnd
    r.label.reshape(-1)[fi] = T[:, 7].astype(np.uint8)
    r.albedo.reshape(3, -1)[:, fi] = alb
    r.normal.reshape(-1)[fi] = N_FRONT
    r.window.reshape(-1)[fi] = window
    r.emission.reshape(3, -1)[:, fi] = T[:, 12:15].T
    r.lamp_head.reshape(-1)[fi] = T[:, 8] > 0


def _raster_sky(r: SceneRaster, layout: SceneLayout) -> None:
    """Sky gradient and clouds on the rows above the horizon (the ground covers the rest)."""
    cam = r.camera
    H, W = r.label.shape
    rows = int(np.clip(np.floor(cam.cy + 0.5), 0, H))
    yc = np.arange(rows, dtype=np.float32) + 0.5
    t = np.clip((cam.cy - yc) / max(cam.cy, 1.0), 0.0, 1.0) ** 0.6
    grad = (
        layout.sky_horizon[None, :] * (1 - t[:, None]) + layout.sky_top[None, :] * t[:, None]
    )  # (rows, 3)
    xc = np.arange(W, dtype=np.float32) + 0.5
    # Clouds: coarse noise in a direction-based parameterisation (stable under camera shifts).
    ang_x = (xc - cam.cx) / cam.focal * 300.0
    ang_y = (cam.cy - yc) / cam.focal * 600.0
    cloud = _tex(COARSE, ang_x[None, :] + 50.0, ang_y[:, None] + 80.0)
    cloud += 0.4 * _tex(FBM, ang_x[None, :] * 3, ang_y[:, None] * 3)
    cover = np.clip((cloud - (1.4 - 1.6 * layout.cloudiness)) * 0.8, 0.0, 0.85)
    white = srgb_to_linear([0.92, 0.92, 0.94])
    r.albedo[:, :rows] = grad.T[:, :, None] * (1 - cover) + white[:, None, None] * cover


def rasterize(layout: SceneLayout, camera: Camera | None = None) -> SceneRaster:
    """Label, depth, albedo and emitters of ``layout`` seen by ``camera`` (default: its own)."""
    cam = camera or layout.camera
    H, W = cam.height, cam.width
    r = SceneRaster(
        camera=cam,
        label=np.full((H, W), SKY, dtype=np.uint8),
        depth=np.full((H, W), np.inf, dtype=np.float32),
        albedo=np.zeros((3, H, W), dtype=np.float32),
        normal=np.full((H, W), N_SKY, dtype=np.uint8),
        window=np.full((H, W), -1.0, dtype=np.float32),
        emission=np.zeros((3, H, W), dtype=np.float32),
        lamp_head=np.zeros((H, W), dtype=bool),
        lamps=layout.lamps,
    )
    _raster_sky(r, layout)
    _raster_ground(r, layout.street)
    for row in layout.facades:
        _raster_facade(r, row)
    pid = np.full((H, W), -1, dtype=np.int32)
    prims: list[tuple[float, Prim]] = []
    for b in sorted(layout.static + layout.dynamic, key=lambda b: -b.z):  # far to near
        _draw_billboard(cam, r.depth, pid, b, len(prims))
        prims += [(b.z, p) for p in b.prims]
    _shade_billboards(r, pid, prims)
    return r


def depth_to_png(depth: np.ndarray) -> np.ndarray:
    """Depth-Anything-style 8-bit map: disparity ``1/Z`` (sky 0) min-max normalised to 0..255.

    Larger values are nearer. Returns (H, W) uint8.
    """
    disp = np.where(np.isfinite(depth), 1.0 / np.maximum(depth, 1e-3), 0.0).astype(np.float32)
    lo, hi = float(disp.min()), float(disp.max())
    if hi <= lo:
        return np.zeros(depth.shape, dtype=np.uint8)
    return np.round((disp - lo) * (255.0 / (hi - lo))).astype(np.uint8)
