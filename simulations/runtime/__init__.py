"""Running a federation on one machine: ``ctfed simulate``, Flower's simulation engine, in-process grids, faults.

Nothing here is shipped to sites or the coordinator: a deployment runs ``ctfed.client.app`` and
``ctfed.server.app`` itself; these modules host the same apps on one machine.
"""
