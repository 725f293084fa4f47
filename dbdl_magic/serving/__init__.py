"""Prediction with stored models: inside the database (into a table) or through the client.
"""
