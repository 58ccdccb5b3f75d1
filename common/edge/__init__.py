"""Edge-device side of serforget: installing signed model releases and running them.

Why a separate package: it runs on devices that have ONNX Runtime but no torch or Flower, so
nothing imported from here may pull those in (tests enforce this). Submodules are imported
directly (``serforget.common.edge.pull``, ``serforget.common.edge.runtime``) rather than re-exported here, so that
running a model never loads the release-verification code and vice versa.
"""
