"""The processes: the supervisor, the workers, the API controller, the compile from the
cluster model to images, and their publication to the workers."""
