"""Reference models written for this project (our own code), each obeying LEMUR's Net contract.

They are shipped as source text (package data), not imported here: the server hands their code to
agents and to the sandbox runner, and must not need torch to do so.
"""

from importlib import resources

REFERENCE_MODELS: dict[str, str] = {
    "LeNet5": "LeNet5.py",
    "SmallVGG": "SmallVGG.py",
    "ResNet8": "ResNet8.py",
    "MobileNetLite": "MobileNetLite.py",
}


def read_code(name: str) -> str:
    """Source code of reference model `name`; raises KeyError naming the valid choices."""
    try:
        filename = REFERENCE_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown reference model {name!r}; known: {', '.join(REFERENCE_MODELS)}") from None
    return resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
