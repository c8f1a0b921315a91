"""The demo behind `make run`: its stages, its process handling and its sample data."""
