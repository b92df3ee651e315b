"""Import-only stand-in for torchvision (tests only): importing works, using anything raises."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from _standin import install_package  # noqa: E402

install_package(__name__)
