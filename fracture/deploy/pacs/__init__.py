"""The DICOM node's room: the node (``python -m fracture.node``), the answers it writes, the source headers they copy,
its spool, the sender to the PACS and the PDU bound. Imports the deploy core and the floors below; never the
service's room."""
