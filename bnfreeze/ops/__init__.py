"""What the commands do on files, without Keras: inspect, edit (freeze, unfreeze, apply),
plans, check and diff. Each takes paths and returns a report value for a renderer.
"""
