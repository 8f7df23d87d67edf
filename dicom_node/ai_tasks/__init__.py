"""The node's AI tasks: each one a class that declares everything the node needs to know about it
(:class:`dicom_node.ai_tasks.interface.Task`), found through the Python entry points of the group
``dicom_node.tasks`` (:mod:`dicom_node.ai_tasks.registry`). The node's own tasks register the same way as a
site's; docs/adding-a-task.md walks through adding one.
"""
