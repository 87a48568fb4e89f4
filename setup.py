"""geosmtp: a gevent mail transfer agent."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def pins(name):
    lines = (HERE / name).read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


version = re.search(r'__version__ = "([^"]+)"', (HERE / "geosmtp" / "__init__.py").read_text()).group(1)

setup(
    name="geosmtp",
    version=version,
    description="A gevent SMTP server: Maildir delivery, durable spool, relay by MX",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["geosmtp", "geosmtp.*"]),
    install_requires=pins("requirements.txt"),
    extras_require={"test": pins("requirements-test.txt")},
    entry_points={"console_scripts": ["geosmtp=geosmtp.entry:main"]},
    scripts=["bin/geosmtp-queue"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)
