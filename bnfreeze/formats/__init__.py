"""File formats: readers and writers for the ``.keras`` zip, an unzipped ``.keras`` folder and
the legacy ``.h5``, plus atomic writes. They know bytes and layouts, not Keras semantics.
"""
