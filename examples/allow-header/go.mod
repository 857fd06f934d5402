module example.com/allow-header

go 1.24
