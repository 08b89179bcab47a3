from cluster_node.cli import main

main()
