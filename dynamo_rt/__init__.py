"""dynamo_rt."""
