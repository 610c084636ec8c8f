"""Training prompt sets: shipped ones (``simple_animals``) and any prompt file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mvz.errors import InputError
from mvz.paths import mvz_home
from mvz.prompts import read_prompt_file

SHIPPED = {"simple_animals": "simple_animals.txt"}
# sets the user brings (licence / not redistributed here): name -> file name looked up under $MVZ_HOME/data
USER_SETS = {"mate3d": "MATE_3D.txt"}


def load_prompt_set(name: str) -> list[str]:
    """A shipped set by name, ``mate3d`` from ``$MVZ_HOME/data/MATE_3D.txt``, or a prompt file path."""
    key = name.strip()
    if key in SHIPPED:
        res = resources.files("mvz").joinpath("data").joinpath(SHIPPED[key])
        with resources.as_file(res) as path:
            return read_prompt_file(path)
    if key.lower() in USER_SETS:
        path = mvz_home() / "data" / USER_SETS[key.lower()]
        if not path.is_file():
            raise InputError(
                f"prompt set {key!r} needs the MATE-3D prompt file ({USER_SETS[key.lower()]}, 160 prompts), "
                f"which mvz does not ship; not found at {path}.",
                f"Copy MVC-ZigAL's mvczigal/data/MATE_3D.txt to {path}, or pass --set prompts.prompt_set=PATH.",
            )
        return read_prompt_file(path)
    path = Path(key).expanduser()
    if not path.exists() and "/" not in key and "." not in key:
        raise InputError(f"prompt set {key!r} is neither a shipped set ({', '.join([*SHIPPED, *USER_SETS])}) nor a file.",
                         "Pass --prompts FILE (one prompt per line) or a shipped set name.")
    return read_prompt_file(path)
