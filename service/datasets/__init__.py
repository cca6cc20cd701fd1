"""Datasets: parse an upload into examples (``formats``), store it content-addressed and load it (``store``)."""
