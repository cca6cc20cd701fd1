from service.cli import main

main(["worker", *__import__("sys").argv[1:]])
