"""Graph -> Graph passes: validation, activity analysis, JVP, VJP, simplification."""
