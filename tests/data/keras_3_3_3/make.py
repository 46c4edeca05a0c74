"""How the files in this folder were written, by Keras 3.3.3 itself (TensorFlow 2.21):

    pip install --target /tmp/k333 keras==3.3.3 --no-deps
    PYTHONPATH=/tmp/k333 KERAS_BACKEND=tensorflow python make.py adam_trained.keras
    PYTHONPATH=/tmp/k333 KERAS_BACKEND=tensorflow python make.py \\
        adam_trained_sub_frozen.keras inner_conv inner_bn

conv -> bn -> a nested model (inner_conv -> inner_bn) -> pool -> dense, the layers named
after the file trainable=False, compiled with Adam and trained two steps, then saved. Keras
3.0 to 3.5 name no layer in model.weights.h5 (groups by class and position) and save the
optimizer's variables by position; the script prints them in Keras's order.
"""

import sys

import keras
import numpy as np

print(keras.__version__, keras.backend.backend())
keras.utils.set_random_seed(3)
inp = keras.Input((6, 6, 2), name="x")
h = keras.layers.Conv2D(3, 3, name="conv")(inp)
h = keras.layers.BatchNormalization(name="bn")(h)
sub_in = keras.Input((4, 4, 3), name="sub_x")
s = keras.layers.Conv2D(3, 1, name="inner_conv")(sub_in)
s = keras.layers.BatchNormalization(name="inner_bn")(s)
h = keras.Model(sub_in, s, name="sub")(h)
h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
out = keras.layers.Dense(1, name="dense")(h)
model = keras.Model(inp, out, name="m")
for layer in model._flatten_layers(include_self=False):
    if layer.name in sys.argv[2:]:
        layer.trainable = False
model.compile(keras.optimizers.Adam(1e-2), "mse")
rng = np.random.default_rng(0)
x = rng.normal(3.0, 2.0, (8, 6, 6, 2)).astype("float32")
y = rng.normal(0.0, 1.0, (8, 1)).astype("float32")
model.fit(x, y, batch_size=8, epochs=2, verbose=0)
model.save(sys.argv[1])
for v in model.optimizer.variables:
    print(v.path if hasattr(v, "path") else v.name, v.shape)
