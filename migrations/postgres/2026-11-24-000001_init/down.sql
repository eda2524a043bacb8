DROP TABLE deliveries;
DROP TABLE notifications;
DROP TABLE devices;
DROP TABLE service_keys;
