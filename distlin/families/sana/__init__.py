"""SANA on row bands: the transformer (:mod:`.transformer`), the DC-AE (:mod:`.vae`), built-in tiny models
(:mod:`.tiny`) and the family's description (:mod:`.family`)."""
