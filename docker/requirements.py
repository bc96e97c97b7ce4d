"""Print the project's requirements for the given extras (Docker build helper).

Why: the Dockerfile installs dependencies before copying the source, so that editing code does
not reinstall torch; the list comes from pyproject.toml, the single place dependencies live.
Usage: python requirements.py pyproject.toml [extra ...]
"""

import sys
import tomllib

with open(sys.argv[1], "rb") as fh:
    project = tomllib.load(fh)["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[2:]:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
