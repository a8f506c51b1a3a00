"""Sample prompts in sd-scripts' prompt syntax, for samples drawn while training.

One prompt per line; options may follow the prompt on its line, each ``--<letter> value``:

    a photo of sks dog on a beach --w 512 --h 768 --s 20 --l 6 --d 42 --n blurry, lowres

``--w`` / ``--h`` width and height in pixels (rounded down to a multiple of 8, at least 64), ``--s`` sampling
steps, ``--l`` CFG scale, ``--d`` seed, ``--n`` negative prompt (the rest of the option's text), ``--ss`` the
sampler of this prompt (an sd-scripts sampler name).  Options are case-insensitive, as in sd-scripts.  An
option this parser does not know, or a bad value, is a one-line error naming the line and the option.

``COMFY_SAMPLERS`` maps sd-scripts' sampler names to the ComfyUI sampler that draws the same kind of sample
(the ``k_`` names of sd-scripts are the same samplers as the plain ones).
"""
from __future__ import annotations

from dataclasses import dataclass

#: sd-scripts sampler name → ComfyUI sampler name (with ComfyUI's scheduler "normal"; ddim: ComfyUI's "ddim")
COMFY_SAMPLERS = {
    "euler_a": "euler_ancestral", "k_euler_a": "euler_ancestral",
    "euler": "euler", "k_euler": "euler",
    "ddim": "ddim", "pndm": "euler",  # ComfyUI has no PNDM; Euler is the closest deterministic sampler
    "lms": "lms", "k_lms": "lms",
    "heun": "heun",
    "dpm_2": "dpm_2", "k_dpm_2": "dpm_2",
    "dpm_2_a": "dpm_2_ancestral", "k_dpm_2_a": "dpm_2_ancestral",
    "dpmsolver": "dpmpp_2m", "dpmsolver++": "dpmpp_2m",  # multistep DPM-Solver
    "dpmsingle": "dpm_fast",  # single-step DPM-Solver
}

#: defaults of the embedded backend's samples: small and fast
DEFAULT_SIZE = 512
DEFAULT_STEPS = 12
DEFAULT_CFG = 5.0

OPTIONS = ("w", "h", "s", "l", "d", "n", "ss")


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    seed: int = 0
    sampler: str = "euler_a"  # an sd-scripts name (COMFY_SAMPLERS)

    @property
    def comfy_sampler(self) -> str:
        return COMFY_SAMPLERS[self.sampler]


def prompt_lines(prompts) -> list[str]:
    """The prompt lines of `prompts` (one string or a list of lines): empty lines and ``#`` comments dropped;
    none left is an error."""
    if isinstance(prompts, str):
        prompts = prompts.splitlines()
    lines = [p.strip() for p in prompts or () if p.strip() and not p.strip().startswith("#")]
    if not lines:
        raise ValueError("sample_prompts: no prompt (one per line)")
    return lines


def _split(line: str) -> tuple[str, list[tuple[str, str]]]:
    """(prompt, [(option, value), …]): options start at `` --`` (or at the start of the line)."""
    parts = (" " + line).split(" --")
    prompt = parts[0].strip()
    options = []
    for part in parts[1:]:
        name, _, value = part.strip().partition(" ")
        options.append((name.lower(), value.strip()))
    return prompt, options


def parse_line(line: str, index: int = 1, *, width: int = DEFAULT_SIZE, height: int = DEFAULT_SIZE,
               steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, seed: int = 0,
               sampler: str = "euler_a") -> SamplePrompt:
    """One prompt line → :class:`SamplePrompt`; the keyword arguments are the values of options not given.
    `index` (1-based) names the line in errors."""
    if sampler not in COMFY_SAMPLERS:
        raise ValueError(f"sample_sampler must be one of {', '.join(COMFY_SAMPLERS)}, got {sampler!r}")
    prompt, options = _split(line)
    where = f"sample_prompts line {index}"
    out = SamplePrompt(prompt, "", width, height, steps, cfg, seed, sampler)

    def number(name, value, kind, low):
        try:
            v = kind(value)
        except ValueError:
            raise ValueError(f"{where}: option --{name} needs a {'number' if kind is float else 'whole number'}, "
                             f"got {value!r}") from None
        if not v >= low or v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{where}: option --{name} must be at least {low}, got {value!r}")
        return v

    for name, value in options:
        if name not in OPTIONS:
            raise ValueError(f"{where}: unknown option --{name or ''} (supported: "
                             f"{' '.join('--' + o for o in OPTIONS)})")
        if name != "n" and not value:
            raise ValueError(f"{where}: option --{name} needs a value")
        if name in ("w", "h"):
            v = number(name, value, int, 64)
            v -= v % 8
            if name == "w":
                out.width = v
            else:
                out.height = v
        elif name == "s":
            out.steps = number(name, value, int, 1)
        elif name == "l":
            out.cfg = number(name, value, float, 0.0)
        elif name == "d":
            out.seed = number(name, value, int, 0)
        elif name == "n":
            out.negative = value
        elif name == "ss":
            if value not in COMFY_SAMPLERS:
                raise ValueError(f"{where}: option --ss must be one of {', '.join(COMFY_SAMPLERS)}, got {value!r}")
            out.sampler = value
    if not out.prompt:
        raise ValueError(f"{where}: no prompt before the options")
    return out


def parse_prompts(prompts, **defaults) -> list[SamplePrompt]:
    """Every prompt line of `prompts` (:func:`prompt_lines`) parsed with :func:`parse_line`."""
    return [parse_line(line, i, **defaults) for i, line in enumerate(prompt_lines(prompts), 1)]
