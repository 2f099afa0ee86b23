"""The decoding engine: options, per-batch state, the step, acceptance rules and the draft sources.

Import the public API from here (`from tidar.decode import generate, GenerationConfig`)."""

from tidar.decode.drafters.datastore import DATASTORE_FILE, Datastore, DatastoreError
from tidar.decode.engine import Decoder, generate
from tidar.decode.options import GenerationConfig, GenerationError
from tidar.decode.stats import GenerationOutput, GenerationStats
from tidar.decode.streamer import TextStreamer

__all__ = ["DATASTORE_FILE", "Datastore", "DatastoreError", "Decoder", "GenerationConfig", "GenerationError",
           "GenerationOutput", "GenerationStats", "TextStreamer", "generate"]
