"""Alert schema, MQTT publisher, durable outbox and paging gateway (a leaf package).

It never imports the engine or the UI; the engine hands it alerts through a sink interface.
"""
