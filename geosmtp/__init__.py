"""geosmtp: a gevent mail transfer agent. Importing the package imports nothing else."""
__version__ = "0.1.0"
