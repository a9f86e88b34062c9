"""The HTTP service's room: the app (``python -m fracture.serve``), its uploads and its connection guards. Imports
the deploy core (predictor, metadata) and the floors below; never the PACS room."""
