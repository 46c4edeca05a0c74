"""Everything that imports Keras: loading a runtime and a model, the Keras edit route,
``verify``'s measurement and ``explain``. Nothing outside this package imports Keras, and
nothing here is imported until a command needs it.
"""
