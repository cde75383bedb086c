"""What the learned planners share: option checks and the router trainer (`common`), TokenCache's
Cache Predictor (`predictor`) and schedule (`tprr`), forecast weights (`extrapolate`, `forecast`),
scoring recipes before export (`evaluate`) and the final choice by whole sampling runs (`select`)."""
