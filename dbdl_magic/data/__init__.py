"""Training data: encoding (statistics computed by SQL) and packing rows into float32 buffers
inside the database.
"""
