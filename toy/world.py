"""The toy world: prompts that name four attributes, images drawn from them, and a scorer that reads them back.

A GenEval-style testbed small enough for a CPU: one object per 64×64 image, described by

    colour     red, green, blue, yellow
    shape      circle, square, triangle
    position   left, right, top, bottom   (which half of the image the object sits in)
    background black, white

as "a red circle on the left, white background". The renderer draws anti-aliased shapes with jitter in
size, place and tint, so the world is a distribution, not 96 fixed pictures. The scorer knows nothing of
the renderer: it finds the background from the image border, the object as the pixels that differ from it,
and reads colour (mean object colour against the palette), position (centre of mass), shape (overlap with
circle/square/triangle templates fitted to the object's extent) and background (border colour) back.

Pure torch, no ComfyUI: the reward (rewards/toy_alignment.py) and the model builder both use it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

SIZE = 64  # pixels, square

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10), "green": (0.12, 0.75, 0.15), "blue": (0.12, 0.22, 0.92), "yellow": (0.95, 0.85, 0.12)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"black": (0.06, 0.06, 0.06), "white": (0.94, 0.94, 0.94)}
ATTRIBUTES = ("colour", "shape", "position", "background")

_POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
# Other ways to say the same scene (Scene.phrasings), with other words for the place.
PHRASINGS = ("{c} {s} {p} on a {b} background", "a {s}, {c}, {p}, {b} background",
             "{b} background with a {c} {s} {p}", "a picture of a {c} {s} {p}, {b} background",
             "a small {c} {s} {p} on {b}", "{c} {s}, {p}, {b}", "an image of a {c} {s} {p} with a {b} background")
_OTHER_POSITION_WORDS = {"left": ("on the left", "at the left", "on the left side"),
                         "right": ("on the right", "at the right", "on the right side"),
                         "top": ("at the top", "on top", "near the top"),
                         "bottom": ("at the bottom", "near the bottom", "on the bottom")}
# object centre (x, y) as fractions of the image, before jitter
_CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} {_POSITION_WORDS[self.position]}, {self.background} background"

    def values(self) -> tuple[str, str, str, str]:
        return self.colour, self.shape, self.position, self.background

    def phrasings(self) -> list[str]:
        """The prompt first, then the same scene as people also write it (PHRASINGS): the shipped toy learned only
        the first, so the others are where its text encoder, not its U-Net, falls short."""
        out = [self.prompt]
        for k, template in enumerate(PHRASINGS):
            places = _OTHER_POSITION_WORDS[self.position]
            text = template.format(c=self.colour, s=self.shape, p=places[k % len(places)], b=self.background)
            if text not in out:
                out.append(text)
        return out


def all_scenes() -> list[Scene]:
    """The 96 attribute combinations, in a fixed order."""
    return [Scene(*v) for v in itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS)]


def _index(scene: Scene) -> tuple[int, int, int, int]:
    return (list(COLOURS).index(scene.colour), SHAPES.index(scene.shape), POSITIONS.index(scene.position),
            list(BACKGROUNDS).index(scene.background))


def is_held_out(scene: Scene) -> bool:
    """A quarter of the combinations (24), never used as training prompts: every single attribute value
    still appears in training, only these combinations of them do not (compositional generalisation)."""
    c, s, p, b = _index(scene)
    return (c + s + p + 2 * b) % 4 == 0


def training_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_held_out(s)]


def held_out_scenes() -> list[Scene]:
    return [s for s in all_scenes() if is_held_out(s)]


def parse_prompt(prompt: str) -> Scene | None:
    """The scene a prompt names (its prompt or one of its phrasings), or None when it names none of the 96."""
    return _BY_PROMPT.get(" ".join(prompt.lower().split()))


def rephrased(scenes: list[Scene]) -> list[str]:
    """Every phrasing but the prompt itself of each scene, scene by scene."""
    return [text for scene in scenes for text in scene.phrasings()[1:]]


_BY_PROMPT = {text: s for s in all_scenes() for text in s.phrasings()}


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def _shape_mask(shape: str, x: torch.Tensor, y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                r: torch.Tensor) -> torch.Tensor:
    """Inside-mask of shapes centred (cx, cy) with half-extent r, on coordinate grids x, y (all broadcast)."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return (dx * dx + dy * dy <= r * r).float()
    if shape == "square":
        s = r * 0.9
        return ((dx.abs() <= s) & (dy.abs() <= s)).float()
    if shape == "triangle":  # apex up, base at the bottom; as wide as tall
        top, bottom = -r, r
        inside_y = (dy >= top) & (dy <= bottom)
        half_width = r * (dy - top) / (bottom - top)
        return (inside_y & (dx.abs() <= half_width)).float()
    raise ValueError(f"unknown shape {shape!r}")


def render(scenes: list[Scene], generator: torch.Generator | None = None, supersample: int = 2) -> torch.Tensor:
    """Images (B, SIZE, SIZE, 3) in 0..1 of the scenes, with random size, place and tint jitter."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n = len(scenes)
    hi = SIZE * supersample
    coords = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    radius = 0.17 + 0.04 * torch.rand(n, generator=g)
    jitter = (torch.rand(n, 2, generator=g) - 0.5) * 0.08
    tint = (torch.rand(n, 3, generator=g) - 0.5) * 0.1
    out = torch.empty(n, 3, hi, hi)
    for i, s in enumerate(scenes):
        cx, cy = _CENTRES[s.position]
        mask = _shape_mask(s.shape, x, y, torch.tensor(cx) + jitter[i, 0], torch.tensor(cy) + jitter[i, 1], radius[i])
        bg = torch.tensor(BACKGROUNDS[s.background]).view(3, 1, 1)
        fg = (torch.tensor(COLOURS[s.colour]) + tint[i]).clamp(0, 1).view(3, 1, 1)
        out[i] = bg * (1 - mask) + fg * mask
    out = torch.nn.functional.avg_pool2d(out, supersample)
    return out.permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# Reading attributes back
# ----------------------------------------------------------------------------------------------
@dataclass
class Readout:
    """Per image and attribute, the probability of each value (rows sum to 1), and how much object there is."""

    colour: torch.Tensor  # (B, 4)
    shape: torch.Tensor  # (B, 3)
    position: torch.Tensor  # (B, 4)
    background: torch.Tensor  # (B, 2)
    object_fraction: torch.Tensor  # (B,) share of pixels that differ from the background

    def probability(self, scenes: list[Scene]) -> torch.Tensor:
        """(B, 4): the probability the scorer gives each named attribute value."""
        idx = torch.tensor([_index(s) for s in scenes])
        rows = torch.arange(len(scenes))
        return torch.stack([self.colour[rows, idx[:, 0]], self.shape[rows, idx[:, 1]],
                            self.position[rows, idx[:, 2]], self.background[rows, idx[:, 3]]], dim=1)

    def correct(self, scenes: list[Scene]) -> torch.Tensor:
        """(B, 4) bool: the scorer's most likely value is the named one."""
        idx = torch.tensor([_index(s) for s in scenes])
        return torch.stack([self.colour.argmax(1) == idx[:, 0], self.shape.argmax(1) == idx[:, 1],
                            self.position.argmax(1) == idx[:, 2], self.background.argmax(1) == idx[:, 3]], dim=1)


_MIN_OBJECT = 0.01  # below this share of pixels there is no object to read colour, shape or place from


def _templates(size: int) -> torch.Tensor:
    """(3, size, size) masks of each shape filling a size × size box (what the object's extent is compared to)."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(c, c, indexing="ij")
    half = torch.tensor(0.5)
    return torch.stack([_shape_mask("circle", x, y, half, half, half),
                        _shape_mask("square", x, y, half, half, half / 0.9),
                        _shape_mask("triangle", x, y, half, half, half)])


def read_back(images: torch.Tensor) -> Readout:
    """What the images show, as probabilities over each attribute's values (images: B×H×W×3 in 0..1)."""
    img = images.detach().float().cpu().clamp(0, 1)
    b, h, w, _ = img.shape
    border = torch.cat([img[:, 0], img[:, -1], img[:, 1:-1, 0], img[:, 1:-1, -1]], dim=1)  # (B, P, 3)
    bg = border.median(dim=1).values  # (B, 3)
    bgs = torch.tensor(list(BACKGROUNDS.values()))
    background = torch.softmax(-((bg[:, None] - bgs[None]) ** 2).sum(-1) / 0.05, dim=1)

    dist = (img - bg[:, None, None]).norm(dim=-1)  # (B, H, W)
    mask = torch.sigmoid((dist - 0.3) / 0.05)
    mass = mask.sum(dim=(1, 2))
    frac = mass / (h * w)
    weight = mask / mass.clamp_min(1e-6)[:, None, None]

    mean_rgb = (img * weight[..., None]).sum(dim=(1, 2))
    pal = torch.tensor(list(COLOURS.values()))
    colour = torch.softmax(-((mean_rgb[:, None] - pal[None]) ** 2).sum(-1) / 0.03, dim=1)

    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
    cx = (weight * xs[None, None, :]).sum(dim=(1, 2))
    cy = (weight * ys[None, :, None]).sum(dim=(1, 2))
    position = torch.softmax(torch.stack([-cx, cx, -cy, cy], dim=1) * 25.0, dim=1)

    shape = torch.empty(b, len(SHAPES))
    for i in range(b):
        shape[i] = _shape_probabilities(mask[i])

    # no object: colour, shape and place cannot be read; every value equally likely
    missing = frac < _MIN_OBJECT
    for t in (colour, shape, position):
        t[missing] = 1.0 / t.shape[1]
    return Readout(colour=colour, shape=shape, position=position, background=background, object_fraction=frac)


def _shape_probabilities(mask: torch.Tensor) -> torch.Tensor:
    """Soft IoU of the object's mask, cut to its extent, with each shape's template at that extent."""
    hard = mask > 0.5
    rows, cols = torch.nonzero(hard.any(1)).flatten(), torch.nonzero(hard.any(0)).flatten()
    if len(rows) < 2 or len(cols) < 2:
        return torch.full((len(SHAPES),), 1.0 / len(SHAPES))
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    templ = torch.nn.functional.interpolate(_templates(64)[None], size=crop.shape, mode="area")[0]
    inter = (templ * crop).sum(dim=(1, 2))
    union = (templ + crop - templ * crop).sum(dim=(1, 2)).clamp_min(1e-6)
    return torch.softmax(inter / union * 20.0, dim=0)


def alignment(images: torch.Tensor, prompts: list[str], strict: bool = False) -> torch.Tensor:
    """(B,) per image: the mean over the four attributes of the probability the scorer gives the named value
    (a smooth reward in 0..1), or with strict=True 1.0 when all four are read back right, else 0.0."""
    scenes = [parse_prompt(p) for p in prompts]
    unknown = [p for p, s in zip(prompts, scenes) if s is None]
    if unknown:
        raise ValueError(f"not a toy-world prompt: {unknown[0]!r}. Prompts name a colour ({', '.join(COLOURS)}), a "
                         f"shape ({', '.join(SHAPES)}), a place and a background, e.g. {all_scenes()[0].prompt!r}.")
    readout = read_back(images)
    if strict:
        return readout.correct(scenes).all(dim=1).float()
    return readout.probability(scenes).mean(dim=1)
